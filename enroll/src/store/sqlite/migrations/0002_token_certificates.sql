-- Which certificate a used token bought: a retry with the same token, key and CSR (the
-- answer was lost) gets that certificate again instead of `token_used`.
CREATE TABLE IF NOT EXISTS token_certificates (
    token_id TEXT PRIMARY KEY,
    serial TEXT NOT NULL
);
