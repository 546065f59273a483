// Signing in to the console through provider.mjs's login page, as a person would: user name,
// any password, and (for a sign-in with a second factor) the current TOTP code.
import { OTP_SECRET, totp } from './otp.mjs';

export async function login(browser, consoleUrl, who, { secondFactor = false } = {}) {
  const context = await browser.newContext({ locale: 'de-DE' });
  const page = await context.newPage();
  await page.goto(`${consoleUrl}/login`);
  await page.getByRole('link', { name: 'Anmelden' }).click();
  await page.locator('input[name="login"]').fill(who);
  await page.locator('input[name="password"]').fill('any');
  if (secondFactor) await page.locator('input[name="otp"]').fill(totp(OTP_SECRET));
  await page.locator('button[type="submit"]').click();
  await page.waitForURL((url) => url.href.startsWith(consoleUrl));
  return { context, page };
}
