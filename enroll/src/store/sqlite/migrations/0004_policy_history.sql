-- Every published policy bundle, not only the one in force: the console shows what changed
-- from the version before. Versions are u64 (SQLite integers are signed), kept as text padded
-- with zeros to 20 digits so that text order is number order: "the newest before version N"
-- is one step along the primary key.
CREATE TABLE IF NOT EXISTS policy_history (
    version TEXT PRIMARY KEY CHECK (length(version) = 20),
    bytes BLOB NOT NULL,
    key_id TEXT NOT NULL,
    published_at INTEGER NOT NULL
);
-- The bundle in force when this migration runs, so that the next publication has a
-- predecessor to compare with.
INSERT OR IGNORE INTO policy_history (version, bytes, key_id, published_at)
    SELECT substr('00000000000000000000' || version, -20), bytes, key_id, published_at
    FROM policy_bundle;
