// A real OpenID provider for the console's browser test: oidc-provider (OpenID Certified),
// with a login page of its own (any password, and an optional one-time code: a real TOTP,
// RFC 6238, checked against each person's secret) and the district's test people. A sign-in
// with a valid code says so as identity providers do: amr ["pwd", "otp"], acr
// "urn:komnet:mfa". Started by console/tests/browser.rs; prints "listening" when it accepts
// connections.
//
//   IDP_PORT=9000 CONSOLE_URL=http://localhost:8080 node provider.mjs
import { createServer } from 'node:http';
import Provider from 'oidc-provider';
import { otpValid } from './otp.mjs';

const port = Number(process.env.IDP_PORT);
const consoleUrl = process.env.CONSOLE_URL;
if (!port || !consoleUrl) {
  console.error('provider.mjs: set IDP_PORT and CONSOLE_URL');
  process.exit(2);
}

// Who may sign in, and the claims the console maps to roles (docs/console.md).
const people = {
  anna: { name: 'Anna Betrieb', groups: ['komnet-operator'] },
  tom: { name: 'Tom Tholey', groups: ['komnet-commune-admin'], komnet_tenant: 'tholey' },
  nina: { name: 'Nina Nohfelden', groups: ['komnet-commune-admin'], komnet_tenant: 'nohfelden' },
  uwe: { name: 'Uwe Heim', groups: ['komnet-user'], komnet_tenant: 'tholey' },
  heidi: { name: 'Heidi Heim', groups: ['komnet-user'], komnet_tenant: 'nohfelden' },
  gast: { name: 'Gast', groups: ['staff'] },
};

const provider = new Provider(`http://localhost:${port}`, {
  clients: [{
    client_id: 'komnet-console',
    client_secret: 'console-test-secret',
    redirect_uris: [`${consoleUrl}/auth/callback`],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  pkce: { required: () => true },
  claims: {
    // What the sign-in was goes with every ID token (the console reads amr, acr and
    // auth_time for MFA-gated home offices).
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    profile: ['name', 'preferred_username'],
    komnet: ['groups', 'komnet_tenant'],
  },
  cookies: { keys: ['komnet-console-test-only'] },
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  acrValues: ['urn:komnet:mfa'],
  async findAccount(ctx, id) {
    const person = people[id];
    if (!person) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, ...person };
      },
    };
  },
  // The test's people consented already: no consent page between login and the console.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid profile komnet');
    await grant.save();
    return grant;
  },
});

const escape = (t) => String(t).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// The login page: user name, password (not checked: test people), one-time code (optional).
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(`<!doctype html><html lang="en"><head><title>Sign-in</title></head><body><main>
<h1>Sign-in</h1>
<form method="post" action="/interaction/${escape(details.uid)}">
<label for="login">User name</label> <input id="login" name="login" autocomplete="username" required>
<label for="password">Password</label> <input id="password" name="password" type="password" required>
<label for="otp">One-time code (optional)</label> <input id="otp" name="otp" inputmode="numeric" autocomplete="one-time-code">
<button type="submit">Sign in</button>
</form></main></body></html>`);
    return;
  }
  let body = '';
  for await (const chunk of req) body += chunk;
  const form = new URLSearchParams(body);
  const who = form.get('login') || '';
  if (!people[who]) {
    res.writeHead(403, { 'content-type': 'text/plain' });
    res.end(`unknown person ${who}`);
    return;
  }
  const otp = form.get('otp') || '';
  if (otp && !otpValid(otp)) {
    res.writeHead(403, { 'content-type': 'text/plain' });
    res.end('wrong one-time code');
    return;
  }
  const login = otp
    ? { accountId: who, amr: ['pwd', 'otp'], acr: 'urn:komnet:mfa' }
    : { accountId: who, amr: ['pwd'] };
  await provider.interactionFinished(req, res, { login }, { mergeWithLastSubmission: false });
}

const handle = provider.callback();
createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((e) => {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(String(e));
    });
  } else {
    handle(req, res);
  }
}).listen(port, '127.0.0.1', () => {
  console.log(`listening on http://localhost:${port}`);
});
