-- Schema version 1: the tables of the first release. `IF NOT EXISTS`: databases of that
-- release carry no version number (user_version 0) and already have them.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    tenant TEXT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    used_at INTEGER,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tenant_pools (
    tenant TEXT PRIMARY KEY,
    pool INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS site_hosts (
    tenant TEXT NOT NULL, site TEXT NOT NULL, host INTEGER NOT NULL,
    PRIMARY KEY (tenant, site),
    UNIQUE (tenant, host)
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    tenant TEXT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    wg_public_key TEXT NOT NULL,
    tunnel_addrs TEXT NOT NULL,
    not_before INTEGER NOT NULL, not_after INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('valid', 'superseded', 'revoked')),
    revoked_at INTEGER, reason TEXT,
    der BLOB NOT NULL
);
-- One valid identity per site and per WireGuard key: the registry is keyed by both.
CREATE UNIQUE INDEX IF NOT EXISTS certificates_one_valid_per_site
    ON certificates (tenant, site) WHERE status = 'valid';
CREATE UNIQUE INDEX IF NOT EXISTS certificates_one_valid_per_key
    ON certificates (wg_public_key) WHERE status = 'valid';
CREATE INDEX IF NOT EXISTS certificates_status ON certificates (status, not_after);
-- Every enrollment answer lists the hubs: a few rows among many thousand spokes.
CREATE INDEX IF NOT EXISTS certificates_role ON certificates (role, status, not_after);
CREATE TABLE IF NOT EXISTS registry_events (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    change TEXT NOT NULL
);
-- One row: the published signed policy bundle. Versions are u64, kept as text like
-- meta.policy_version (SQLite integers are signed).
CREATE TABLE IF NOT EXISTS policy_bundle (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version TEXT NOT NULL,
    bytes BLOB NOT NULL,
    key_id TEXT NOT NULL,
    published_at INTEGER NOT NULL
);
-- Home-office addresses come from the policy's pools, not from site_hosts: they are whole
-- addresses (the pools can change with the policy), held until the holder's expiry.
CREATE TABLE IF NOT EXISTS homeoffice_addrs (
    tenant TEXT NOT NULL, user TEXT NOT NULL, addr TEXT NOT NULL,
    held_until INTEGER NOT NULL,
    PRIMARY KEY (tenant, addr)
);
CREATE INDEX IF NOT EXISTS homeoffice_addrs_user ON homeoffice_addrs (tenant, user);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL
);
