// TOTP (RFC 6238: HMAC-SHA1, 30 s steps, 6 digits) for the browser test: the provider checks
// codes with it, the test computes them as a person's authenticator app would.
import { createHmac } from 'node:crypto';

// Every test person's secret.
export const OTP_SECRET = Buffer.from('komnet-e2e-otp-secret-20b', 'utf8');

export function totp(secret, step = Math.floor(Date.now() / 30_000)) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const mac = createHmac('sha1', secret).update(counter).digest();
  const offset = mac[mac.length - 1] & 0xf;
  const code = (mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000;
  return String(code).padStart(6, '0');
}

// A code of this step or a neighbouring one (clocks drift, people type slowly).
export function otpValid(code, secret = OTP_SECRET) {
  const step = Math.floor(Date.now() / 30_000);
  return [step - 1, step, step + 1].some((s) => totp(secret, s) === code);
}
