-- MFA-gated home-office tunnels: a device of a tenant with [mfa_window] is admitted at the
-- hubs only until the end of the window its person's last sign-in with a second factor
-- opened (Unix seconds); NULL: as long as the certificate is valid.
ALTER TABLE certificates ADD COLUMN admitted_until BIGINT;
