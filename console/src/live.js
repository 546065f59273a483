// Live updates of the fleet table: a small progressive enhancement (the page works without
// it). Every 10 s the table is fetched again (/fleet/table, the same session) and swapped in;
// a button pauses and resumes it (WCAG 2.2.2). Updates are not announced to screen readers:
// a table read aloud every 10 s would drown everything else; the time of the last update is.
(function () {
  'use strict';
  var region = document.getElementById('fleet-live');
  var stamp = document.getElementById('fleet-stamp');
  if (!region || !stamp || !window.fetch) return;
  var de = document.documentElement.lang === 'de';
  var button = document.createElement('button');
  button.type = 'button';
  button.id = 'fleet-pause';
  var paused = false;
  function label() {
    button.textContent = paused
      ? (de ? 'Automatische Aktualisierung fortsetzen' : 'Resume automatic updates')
      : (de ? 'Automatische Aktualisierung anhalten' : 'Pause automatic updates');
    button.setAttribute('aria-pressed', paused ? 'true' : 'false');
  }
  label();
  button.addEventListener('click', function () { paused = !paused; label(); });
  stamp.parentNode.insertBefore(button, stamp.nextSibling);
  stamp.parentNode.insertBefore(document.createTextNode(' '), button);
  function refresh() {
    if (paused || document.hidden) return;
    fetch('/fleet/table', { credentials: 'same-origin', cache: 'no-store' })
      .then(function (r) {
        if (r.status === 401 || r.redirected) { paused = true; label(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        region.innerHTML = html;
        var now = new Date();
        stamp.textContent = (de ? 'Aktualisiert um ' : 'Updated at ') + now.toLocaleTimeString(de ? 'de-DE' : 'en-GB');
      })
      .catch(function () {});
  }
  setInterval(refresh, 10000);
})();
