-- Every published policy bundle, not only the one in force: the console shows what changed
-- from the version before. Versions are u64, which do not fit a signed BIGINT: kept as text
-- padded with zeros to 20 digits so that text order is number order (collation "C": byte
-- order, whatever the database's default collation is), and "the newest before version N" is
-- one step along the primary key.
CREATE TABLE policy_history (
    version TEXT COLLATE "C" PRIMARY KEY CHECK (length(version) = 20),
    bytes BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    published_at BIGINT NOT NULL
);
-- The bundle in force when this migration runs, so that the next publication has a
-- predecessor to compare with.
INSERT INTO policy_history (version, bytes, key_id, published_at)
    SELECT lpad(version, 20, '0'), bytes, key_id, published_at FROM policy_bundle;
