//! The Redis Functions library that writes documents (`documents.lua`): its version, the
//! functions' names, and loading it where a server (on a cluster: a primary) lacks this version.

use ::redis::RedisError;

use super::cluster::Conn;
use crate::settings::Storage;

/// The function library, loaded with FUNCTION LOAD REPLACE when the server lacks this version.
pub const LIBRARY: &str = include_str!("documents.lua");
/// Must equal `LIBRARY_VERSION` in documents.lua (a unit test checks); bump both on any change,
/// with the library's name and every function's suffix.
const LIBRARY_VERSION: &str = "5";

/// The functions, named with the library's version (library `embed_worker_v5`): workers of two
/// versions in one rolling upgrade each call their own library's, and one loading its library
/// never replaces the other's (a worker of library 3 loads `embed_worker`, with unsuffixed names).
pub const FN_ADOPT: &str = "ew_adopt_v5";
const FN_LIBRARY_VERSION: &str = "ew_library_version_v5";

/// A document function: each exists once per storage (`ew_upsert_v5` on hashes,
/// `ew_json_upsert_v5` on JSON documents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocFn {
    Upsert,
    Touch,
    Delete,
    Reembed,
    Retire,
}

impl DocFn {
    pub const ALL: [DocFn; 5] = [
        DocFn::Upsert,
        DocFn::Touch,
        DocFn::Delete,
        DocFn::Reembed,
        DocFn::Retire,
    ];

    /// The function's name for `storage`.
    pub fn name(self, storage: Storage) -> &'static str {
        use DocFn::*;
        match (storage, self) {
            (Storage::Hash, Upsert) => "ew_upsert_v5",
            (Storage::Hash, Touch) => "ew_touch_v5",
            (Storage::Hash, Delete) => "ew_delete_v5",
            (Storage::Hash, Reembed) => "ew_reembed_v5",
            (Storage::Hash, Retire) => "ew_retire_v5",
            (Storage::Json, Upsert) => "ew_json_upsert_v5",
            (Storage::Json, Touch) => "ew_json_touch_v5",
            (Storage::Json, Delete) => "ew_json_delete_v5",
            (Storage::Json, Reembed) => "ew_json_reembed_v5",
            (Storage::Json, Retire) => "ew_json_retire_v5",
        }
    }
}

/// A function call refused because the library (or this version of it) is not loaded.
pub(super) fn is_missing_function(err: &RedisError) -> bool {
    err.to_string()
        .to_lowercase()
        .contains("function not found")
}

/// Loads the function library unless the server (on a cluster: every primary) already has this
/// version. True if it loaded.
pub async fn ensure(conn: &mut Conn) -> Result<bool, RedisError> {
    let mut version = ::redis::cmd("FCALL");
    version.arg(FN_LIBRARY_VERSION).arg(0);
    for node in conn.on_primaries(&version).await? {
        let current = match node.reply {
            Ok(v) => ::redis::from_redis_value::<String>(v).ok() == Some(LIBRARY_VERSION.into()),
            Err(e) if is_missing_function(&e) => false,
            Err(e) => return Err(e),
        };
        if !current {
            // FUNCTION LOAD goes to every primary.
            return load_library(conn).await.map(|()| true);
        }
    }
    Ok(false)
}

/// FUNCTION LOAD REPLACE of this library (on a cluster: every primary).
pub(super) async fn load_library(conn: &mut Conn) -> Result<(), RedisError> {
    let _: String = ::redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::documents::BOOKKEEPING_FIELDS;

    #[test]
    fn the_library_declares_the_version_this_code_expects() {
        assert!(
            LIBRARY.contains(&format!("local LIBRARY_VERSION = '{LIBRARY_VERSION}'")),
            "bump LIBRARY_VERSION in library.rs and documents.lua together"
        );
        for field in BOOKKEEPING_FIELDS {
            assert!(LIBRARY.contains(&format!("'{field}'")), "{field}");
        }
        assert!(LIBRARY.starts_with(&format!("#!lua name=embed_worker_v{LIBRARY_VERSION}\n")));
        for f in [FN_ADOPT, FN_LIBRARY_VERSION] {
            assert!(f.ends_with(&format!("_v{LIBRARY_VERSION}")), "{f}");
            assert!(LIBRARY.contains(&format!("'{f}'")), "{f} is not registered");
        }
        // The document functions are registered in a loop, per storage.
        assert!(LIBRARY.contains(&format!(
            "redis.register_function('ew_' .. name .. '_v{LIBRARY_VERSION}'"
        )));
        assert!(LIBRARY.contains(&format!(
            "redis.register_function('ew_json_' .. name .. '_v{LIBRARY_VERSION}'"
        )));
        assert!(!LIBRARY.contains("in pairs("), "no pairs() at load time");
        for f in DocFn::ALL {
            let hash = f.name(Storage::Hash);
            let base = hash
                .strip_prefix("ew_")
                .and_then(|b| b.strip_suffix(&format!("_v{LIBRARY_VERSION}")))
                .unwrap();
            assert!(
                LIBRARY.contains(&format!("both('{base}', {base})")),
                "{base} is not registered"
            );
            assert_eq!(
                f.name(Storage::Json),
                format!("ew_json_{base}_v{LIBRARY_VERSION}")
            );
        }
    }
}
