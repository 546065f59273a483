// One sign-in to the console for the MFA test in network namespaces
// (tests/tests/district/mfa.rs): signs in as WHO, with a one-time code when asked, opens
// /devices and prints each device's access cell as "ACCESS <text>"; exits 1 on any failure.
//
//   CONSOLE_URL=http://localhost:8080 CHROMIUM=/usr/bin/chromium node mfa.mjs WHO [--otp]
import { chromium } from 'playwright-core';
import { login } from './signin.mjs';

const CONSOLE = process.env.CONSOLE_URL;
const who = process.argv[2];
const secondFactor = process.argv.includes('--otp');
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  // The test runs as root, where Chromium's sandbox cannot start.
  args: ['--no-sandbox'],
});
let failed = false;
try {
  const { page } = await login(browser, CONSOLE, who, { secondFactor });
  await page.goto(`${CONSOLE}/devices`);
  const cells = await page.locator('td.access').allInnerTexts();
  if (cells.length === 0) throw new Error(`no device listed for ${who}: ${await page.locator('main').innerText()}`);
  for (const c of cells) console.log(`ACCESS ${c}`);
} catch (e) {
  console.error(`FAILED: ${e.message}`);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
