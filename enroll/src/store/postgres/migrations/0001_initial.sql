-- Schema version 1 on PostgreSQL: the same tables as SQLite's version 1. Seconds since the
-- epoch are BIGINT; u64 versions, which do not fit a signed BIGINT, are kept as text.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL,
    tenant TEXT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
    used_at BIGINT,
    created_by TEXT NOT NULL
);
CREATE TABLE tenant_pools (
    tenant TEXT PRIMARY KEY,
    pool BIGINT NOT NULL UNIQUE
);
-- Unique per tenant: two replicas can never give one host number (one address) to two sites.
CREATE TABLE site_hosts (
    tenant TEXT NOT NULL, site TEXT NOT NULL, host BIGINT NOT NULL,
    PRIMARY KEY (tenant, site),
    UNIQUE (tenant, host)
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    tenant TEXT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    wg_public_key TEXT NOT NULL,
    tunnel_addrs TEXT NOT NULL,
    not_before BIGINT NOT NULL, not_after BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('valid', 'superseded', 'revoked')),
    revoked_at BIGINT, reason TEXT,
    der BYTEA NOT NULL
);
-- One valid identity per site and per WireGuard key: the registry is keyed by both.
CREATE UNIQUE INDEX certificates_one_valid_per_site
    ON certificates (tenant, site) WHERE status = 'valid';
CREATE UNIQUE INDEX certificates_one_valid_per_key
    ON certificates (wg_public_key) WHERE status = 'valid';
CREATE INDEX certificates_status ON certificates (status, not_after);
CREATE INDEX certificates_role ON certificates (role, status, not_after);
-- Versions are given out at commit under a lock (store/postgres/txn.rs), so they become
-- visible in order and a reader that has version N has every version below it.
CREATE TABLE registry_events (
    version BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    change TEXT NOT NULL
);
CREATE TABLE policy_bundle (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    published_at BIGINT NOT NULL
);
-- `holder`, not `user` as in SQLite: a reserved word here.
CREATE TABLE homeoffice_addrs (
    tenant TEXT NOT NULL, holder TEXT NOT NULL, addr TEXT NOT NULL,
    held_until BIGINT NOT NULL,
    PRIMARY KEY (tenant, addr)
);
CREATE INDEX homeoffice_addrs_holder ON homeoffice_addrs (tenant, holder);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL
);
