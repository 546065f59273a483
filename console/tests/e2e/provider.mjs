// A real OpenID provider for the console's browser test: oidc-provider (OpenID Certified),
// with its development login pages (any password) and the district's test people. Started by
// console/tests/browser.rs; prints "listening" when it accepts connections.
//
//   IDP_PORT=9000 CONSOLE_URL=http://localhost:8080 node provider.mjs
import Provider from 'oidc-provider';

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
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    komnet: ['groups', 'komnet_tenant'],
  },
  cookies: { keys: ['komnet-console-test-only'] },
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

provider.listen(port, '127.0.0.1', () => {
  console.log(`listening on http://localhost:${port}`);
});
