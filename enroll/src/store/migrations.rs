//! Versioned schema migrations, one list per backend, numbered alike: schema version N means
//! the same tables in SQLite and in PostgreSQL. Each migration runs in its own transaction
//! together with the record of its version, at start (`init` and `serve`), in order; a database
//! whose version is higher than the last one this build knows is refused, never half
//! understood. A migration, once released, is never edited: a change is a new one.
//!
//! Where the version is kept: SQLite in `PRAGMA user_version` (a header field, written in the
//! same transaction), PostgreSQL in the table `schema_migrations` (version, name, when).

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("sqlite/migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "token_certificates",
        sql: include_str!("sqlite/migrations/0002_token_certificates.sql"),
    },
    Migration {
        version: 3,
        name: "admission_windows",
        sql: include_str!("sqlite/migrations/0003_admission_windows.sql"),
    },
    Migration {
        version: 4,
        name: "policy_history",
        sql: include_str!("sqlite/migrations/0004_policy_history.sql"),
    },
    Migration {
        version: 5,
        name: "hub_reports",
        sql: include_str!("sqlite/migrations/0005_hub_reports.sql"),
    },
];

pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("postgres/migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "token_certificates",
        sql: include_str!("postgres/migrations/0002_token_certificates.sql"),
    },
    Migration {
        version: 3,
        name: "admission_windows",
        sql: include_str!("postgres/migrations/0003_admission_windows.sql"),
    },
    Migration {
        version: 4,
        name: "policy_history",
        sql: include_str!("postgres/migrations/0004_policy_history.sql"),
    },
    Migration {
        version: 5,
        name: "hub_reports",
        sql: include_str!("postgres/migrations/0005_hub_reports.sql"),
    },
];

/// The schema version this build writes (the same for both backends).
pub const SCHEMA_VERSION: i64 = 5;

/// The migrations a database at `found` still needs, or `Err(latest)` when it is newer than
/// this build.
pub fn pending(list: &'static [Migration], found: i64) -> Result<&'static [Migration], i64> {
    let latest = list.last().map(|m| m.version).unwrap_or(0);
    if found > latest {
        return Err(latest);
    }
    let done = list.iter().take_while(|m| m.version <= found).count();
    Ok(&list[done..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_number_their_migrations_alike_and_without_gaps() {
        for list in [SQLITE, POSTGRES] {
            let versions: Vec<i64> = list.iter().map(|m| m.version).collect();
            assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        }
        let names = |l: &[Migration]| l.iter().map(|m| m.name).collect::<Vec<_>>();
        assert_eq!(names(SQLITE), names(POSTGRES));
    }

    #[test]
    fn pending_is_what_lies_above_the_database_and_a_newer_one_is_refused() {
        assert_eq!(pending(SQLITE, 0).unwrap().len(), 5);
        assert_eq!(pending(SQLITE, 1).unwrap()[0].version, 2);
        let from_3: Vec<i64> = pending(POSTGRES, 3)
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(from_3, (4..=SCHEMA_VERSION).collect::<Vec<_>>());
        assert!(pending(SQLITE, SCHEMA_VERSION).unwrap().is_empty());
        assert_eq!(
            pending(POSTGRES, SCHEMA_VERSION + 1).unwrap_err(),
            SCHEMA_VERSION
        );
    }

    /// A database that has a published bundle when it reaches version 4 starts its history
    /// with that bundle, its version padded so that text order is number order.
    #[test]
    fn the_policy_history_starts_with_the_bundle_in_force() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for m in &SQLITE[..3] {
            conn.execute_batch(m.sql).unwrap();
        }
        conn.execute(
            "INSERT INTO policy_bundle (id, version, bytes, key_id, published_at) \
             VALUES (1, '18446744073709551615', x'0102', 'k0', 100)",
            [],
        )
        .unwrap();
        conn.execute_batch(SQLITE[3].sql).unwrap();
        let row = conn
            .query_row(
                "SELECT version, bytes, key_id, published_at FROM policy_history",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(
            row,
            ("18446744073709551615".into(), vec![1, 2], "k0".into(), 100)
        );
        conn.execute("UPDATE policy_bundle SET version = '7'", [])
            .unwrap();
        conn.execute("DELETE FROM policy_history", []).unwrap();
        conn.execute_batch(SQLITE[3].sql).unwrap();
        let version: String = conn
            .query_row("SELECT version FROM policy_history", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, "00000000000000000007");
    }
}
