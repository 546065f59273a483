// The console in a real browser (Debian's Chromium, headless, driven by Playwright) against the
// real identity provider (provider.mjs) and a real enrollment service: started by
// console/tests/browser.rs, which seeds the fleet and checks the audit log afterwards.
//
// Each step prints one line; the first failure exits 1 with what was expected and what the
// page showed.
import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { AxeBuilder } from '@axe-core/playwright';
import { login as signIn } from './signin.mjs';

const CONSOLE = process.env.CONSOLE_URL;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = process.env.SCREENSHOT_DIR || '';

function check(ok, what, detail = '') {
  if (!ok) {
    throw new Error(`${what}${detail ? `: ${detail}` : ''}`);
  }
  console.log(`ok  ${what}`);
}

function login(browser, who, options) {
  return signIn(browser, CONSOLE, who, options);
}

async function axe(page, name) {
  const result = await new AxeBuilder({ page }).withTags(['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']).analyze();
  const bad = result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  check(bad.length === 0, `axe-core: no serious violations on ${name}`,
    bad.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(' ')).join(', ')}`).join('; '));
}

async function shot(page, name) {
  if (SHOTS) await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
}

/// The session's CSRF token, as its forms carry it.
async function csrfOf(page) {
  return page.locator('input[name="csrf"]').first().getAttribute('value');
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  // The test runs as root, where Chromium's sandbox cannot start.
  args: ['--no-sandbox'],
});
let failed = false;
try {
  // The sign-in page, before anyone signs in.
  {
    const context = await browser.newContext();
    const page = await context.newPage();
    const resp = await page.goto(`${CONSOLE}/fleet`);
    check(page.url() === `${CONSOLE}/login`, 'an anonymous request is sent to the sign-in page', page.url());
    const csp = resp.headers()['content-security-policy'] || '';
    check(csp.includes("default-src 'none'") && csp.includes("form-action 'self'"), 'strict Content-Security-Policy', csp);
    await axe(page, '/login');
    await shot(page, 'console-login');
    await context.close();
  }

  // Anna, operator: every commune.
  {
    const { context, page } = await login(browser, 'anna');
    check(new URL(page.url()).pathname === '/fleet', 'the operator lands on the fleet', page.url());
    const table = await page.locator('table').innerText();
    check(table.includes('tholey') && table.includes('nohfelden'), 'the operator sees both communes', table);
    const townHall = await page.locator('#fleet-live tr', { hasText: 'tholey' })
      .filter({ has: page.getByRole('link', { name: 'rathaus', exact: true }) }).innerText();
    check(townHall.includes('verbunden · vor 1 Minute') && townHall.includes('(hub1)') && /\t3\t/.test(townHall),
      "the fleet shows the hub's report: last handshake, which hub, refused packets", townHall);
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === '__Host-komnet-session');
    check(session && session.httpOnly && session.secure && session.sameSite === 'Lax',
      'the session cookie is HttpOnly, Secure, SameSite=Lax', JSON.stringify(session));
    await axe(page, '/fleet');
    await shot(page, 'console-fleet');
    await page.getByRole('link', { name: 'rathaus' }).first().click();
    check((await page.locator('h1').innerText()).includes('rathaus'), 'site detail opens');
    await axe(page, '/sites/…');
    await shot(page, 'console-site');
    await page.goto(`${CONSOLE}/audit`);
    await axe(page, '/audit');
    await page.goto(`${CONSOLE}/audit?tenant=nohfelden&action=enroll`);
    const rows = await page.locator('table.audit tbody tr').allInnerTexts();
    check(rows.length >= 1 && rows.every((r) => r.includes('nohfelden') && r.includes('enroll')),
      'the audit filter (tenant, action) shows only matching entries', rows.join(' | '));
    await shot(page, 'console-audit');
    // The policy in force, and why a segment may reach a service.
    await page.goto(`${CONSOLE}/policy`);
    const facts = await page.locator('dl.facts').innerText();
    check(facts.includes('Landkreis St. Wendel') && facts.includes('browser-test'),
      'the policy page shows the policy in force and who published it', facts);
    await page.getByLabel(/^Von/).fill('tholey/verwaltung');
    await page.getByLabel(/^Nach/).fill('tholey/dateiserver');
    await page.getByRole('button', { name: 'Erklären' }).click();
    const why = await page.locator('ul.explain').innerText();
    check(why.includes('allow') && why.includes('staff-files'), 'explain: verwaltung may reach the file server by rule staff-files', why);
    // What version 2 changed from version 1: a site added, a description replaced, said in
    // text (+/-) and marked up as <ins>/<del>, not in colour alone.
    const changes = await page.getByRole('heading', { level: 2, name: 'Änderungen gegenüber Version 1' }).count();
    check(changes === 1, 'the policy page has the section "Änderungen gegenüber Version 1"', String(changes));
    const diff = page.locator('table.diff').first();
    const added = await diff.locator('tr.add').allInnerTexts();
    const removed = await diff.locator('tr.del').allInnerTexts();
    check(added.some((r) => r.includes('+') && r.includes('[tenants.tholey.sites.freibad]'))
      && added.some((r) => r.includes('Gemeinde Tholey (Schaumberg)')),
      'the diff shows the added lines with a "+"', added.join(' | '));
    check(removed.some((r) => r.includes('-') && r.includes('description = "Gemeinde Tholey"')),
      'the diff shows the removed line with a "-"', removed.join(' | '));
    const ins = await diff.locator('ins').allInnerTexts();
    const del = await diff.locator('del').allInnerTexts();
    check(ins.includes('version = 2') && del.includes('version = 1'), 'changed lines are <ins> and <del>', `${ins} / ${del}`);
    const nearby = await diff.locator('tr.same').allInnerTexts();
    check(nearby.some((r) => r.includes('[tenants.tholey]')) && !nearby.some((r) => r.includes('[services.dms]')),
      'unchanged lines near a change are shown, far ones left out', nearby.join(' | '));
    await axe(page, '/policy');
    await shot(page, 'console-policy');
    await page.goto(`${CONSOLE}/tokens`);
    await axe(page, '/tokens');
    // English is one click away.
    await page.getByRole('link', { name: 'English' }).click();
    check((await page.locator('h1').innerText()) === 'Create token', 'the language switch shows English');
    await context.close();
  }

  // Anna keeps the fleet open while Tom works: the page follows without a reload.
  const watcher = await login(browser, 'anna');
  check((await watcher.page.locator('#fleet-pause').count()) === 1, 'the fleet page offers to pause its live updates');
  check((await watcher.page.locator('#fleet-live').innerText()).includes('bauhof'), 'the open fleet lists Tholey\'s bauhof');

  // Tom, commune admin of Tholey: Tholey only, whatever URL he types.
  {
    const { context, page } = await login(browser, 'tom');
    const table = await page.locator('table').innerText();
    check(table.includes('tholey') && !table.includes('nohfelden'), "Tholey's admin sees only Tholey", table);
    let resp = await page.goto(`${CONSOLE}/sites/nohfelden/rathaus`);
    check(resp.status() === 404, "Nohfelden's site URL answers Tholey's admin 404", String(resp.status()));
    resp = await page.goto(`${CONSOLE}/sites/tholey/rathaus`);
    check(resp.status() === 200, 'his own site answers 200', String(resp.status()));
    const csrf = await csrfOf(page);
    resp = await page.request.post(`${CONSOLE}/sites/nohfelden/rathaus/revoke`, {
      form: { csrf, reason: 'key_compromise', confirm: 'yes' }, maxRedirects: 0,
    });
    check(resp.status() === 404, "revoking Nohfelden's site is refused (404)", String(resp.status()));
    await page.goto(`${CONSOLE}/audit?tenant=nohfelden`);
    const rows = await page.locator('table.audit tbody').innerText().catch(() => '');
    check(!rows.includes('nohfelden'), "the audit log shows Tholey's admin no Nohfelden entries", rows);

    // CSRF: a post without the token, with a wrong one, or from another origin is refused.
    const form = { site: 'schule', role: 'spoke', ttl: '86400' };
    resp = await page.request.post(`${CONSOLE}/tokens`, { form, maxRedirects: 0 });
    check(resp.status() === 403, 'a form without CSRF token is refused (403)', String(resp.status()));
    resp = await page.request.post(`${CONSOLE}/tokens`, { form: { ...form, csrf: 'forged' }, maxRedirects: 0 });
    check(resp.status() === 403, 'a form with a wrong CSRF token is refused (403)', String(resp.status()));
    resp = await page.request.post(`${CONSOLE}/tokens`, {
      form: { ...form, csrf }, headers: { Origin: 'https://evil.example' }, maxRedirects: 0,
    });
    check(resp.status() === 403, 'a form from another origin is refused (403)', String(resp.status()));

    // A token for a new site: the bootstrap file downloads.
    await page.goto(`${CONSOLE}/tokens`);
    await page.getByLabel('Standort (z. B. rathaus)').fill('schule');
    const [download] = await Promise.all([
      page.waitForEvent('download'),
      page.getByRole('button', { name: 'Token erstellen und Datei herunterladen' }).click(),
    ]);
    check(download.suggestedFilename() === 'komnet-bootstrap-tholey-schule.json', 'the bootstrap file is named for the site', download.suggestedFilename());
    const file = JSON.parse(readFileSync(await download.path(), 'utf8'));
    check(typeof file.token === 'string' && file.token.startsWith('kmt1.') && file.root_ca_pem.includes('BEGIN CERTIFICATE'),
      'the bootstrap file carries the token and the root CA');
    console.log(`BOOTSTRAP_TOKEN_ID ${file.token.split('.')[1]}`);

    // Revoking his own site: reason and confirmation.
    await page.goto(`${CONSOLE}/sites/tholey/bauhof`);
    await page.getByLabel('Grund').selectOption('key_compromise');
    await page.getByRole('button', { name: 'Zertifikat widerrufen' }).click();
    check(page.url().endsWith('/sites/tholey/bauhof') && (await page.locator('input:invalid').count()) === 1,
      'revoking without confirmation does not submit');
    await page.getByLabel(/Ich bestätige/).check();
    await page.getByRole('button', { name: 'Zertifikat widerrufen' }).click();
    await page.waitForLoadState();
    check((await page.locator('main').innerText()).includes('kein gültiges Zertifikat'),
      'after the revocation the site has no valid certificate');
    await shot(page, 'console-revoked');

    // Signing out ends the session on the server.
    await page.getByRole('button', { name: 'Abmelden' }).click();
    await page.goto(`${CONSOLE}/fleet`);
    check(page.url() === `${CONSOLE}/login`, 'after signing out the session is gone', page.url());
    await context.close();
  }

  // Tom revoked the bauhof: Anna's open page drops it by itself.
  await watcher.page.waitForFunction(
    () => !document.getElementById('fleet-live').innerText.includes('bauhof'), null, { timeout: 20000 });
  check(new URL(watcher.page.url()).pathname === '/fleet', 'the open fleet page dropped the revoked site without a reload');
  await watcher.context.close();

  // Uwe, home office in Tholey: his own devices, nothing else.
  {
    const { context, page } = await login(browser, 'uwe');
    check(new URL(page.url()).pathname === '/devices', 'a user lands on his devices', page.url());
    let resp = await page.goto(`${CONSOLE}/fleet`);
    check(resp.status() === 403, 'the fleet is refused to a user (403)', String(resp.status()));
    resp = await page.goto(`${CONSOLE}/sites/tholey/rathaus`);
    check(resp.status() === 403, "his commune's sites are refused to a user (403)", String(resp.status()));
    await page.goto(`${CONSOLE}/devices`);
    await axe(page, '/devices');
    const csrf = await csrfOf(page);
    resp = await page.request.post(`${CONSOLE}/devices/anna_laptop/revoke`, { form: { csrf, confirm: 'yes' }, maxRedirects: 0 });
    check(resp.status() === 404, "someone else's device cannot be revoked (404)", String(resp.status()));
    await page.getByLabel(/Gerätename/).fill('laptop');
    await page.getByRole('button', { name: 'Gerät einrichten' }).click();
    await page.waitForLoadState();
    const config = await page.locator('pre.config').textContent();
    check(/PrivateKey = \S+/.test(config) && config.includes('Endpoint = 203.0.113.1:51820'),
      'the wg-quick configuration carries the private key and the hub', config);
    check((await page.locator('img.qr').count()) === 1, 'the QR code is shown');
    const file = await page.locator('a[download]').getAttribute('download');
    check(file === 'komnet-tholey-laptop.conf', 'the configuration downloads as a file', file);
    await axe(page, 'the new device');
    await shot(page, 'console-device');
    await page.goto(`${CONSOLE}/devices`);
    let list = await page.locator('main').innerText();
    check(list.includes('laptop') && !list.includes('PrivateKey'), 'the device is listed; its private key is not shown again', list);
    // Tholey's home offices are MFA-gated: without a second factor the device stays closed.
    check(list.includes('keinen zweiten Faktor') && (await page.locator('td.access').innerText()).includes('gesperrt'),
      'without a second factor the device is closed and the page says why', list);
    await context.close();
  }
  {
    // Uwe signs in again with his one-time code: the window opens, the page says until when.
    const { context, page } = await login(browser, 'uwe', { secondFactor: true });
    await page.goto(`${CONSOLE}/devices`);
    const access = await page.locator('td.access').innerText();
    check(/^verbunden bis \d{4}-\d\d-\d\d \d\d:\d\d/.test(access),
      'after a sign-in with a second factor the device is connected, until the window ends', access);
    console.log(`MFA_WINDOW ${access}`);
    await axe(page, '/devices with an open MFA window');
    await shot(page, 'console-devices');
    await page.getByLabel('Ja, laptop sperren').check();
    await page.getByRole('button', { name: /Widerrufen/ }).click();
    await page.waitForLoadState();
    check((await page.locator('main').innerText()).includes('noch kein Gerät'), 'after revoking it the device is gone');
    await context.close();
  }

  // Someone the identity provider knows, without a console role.
  {
    const { context, page } = await login(browser, 'gast');
    const alert = await page.locator('[role="alert"]').innerText();
    check(alert.includes('none of'), 'a person without a console role is refused', alert);
    await page.goto(`${CONSOLE}/fleet`);
    check(page.url() === `${CONSOLE}/login`, 'and gets no session', page.url());
    await context.close();
  }
} catch (e) {
  console.error(`FAILED: ${e.message}`);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
