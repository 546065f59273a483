//! The policy files' JSON Schema, generated from the types that parse them (`syntax.rs`), so
//! that it can never drift from what `check` accepts: editors with TOML schema support (taplo,
//! Even Better TOML) complete keys and flag typos while typing, and the checker itself uses it to
//! report every unknown key and wrong type of a file at once, with the closest key as a hint.
//!
//! Two schemas: one for `operator.toml`, one for `tenants/TENANT.toml` (JSON Schema draft 7,
//! the dialect editors support most widely). `komnet policy schema` writes them; the Debian
//! package ships them in `/usr/share/komnet/schema/`.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Which policy file a schema describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `operator.toml`.
    Operator,
    /// `tenants/TENANT.toml`.
    Tenant,
}

impl FileKind {
    /// The schema's file name: `operator.schema.json`, `tenant.schema.json`.
    pub fn schema_file_name(self) -> &'static str {
        match self {
            FileKind::Operator => "operator.schema.json",
            FileKind::Tenant => "tenant.schema.json",
        }
    }
}

/// The JSON Schema of one kind of policy file.
pub fn schema(kind: FileKind) -> &'static Value {
    static OPERATOR: OnceLock<Value> = OnceLock::new();
    static TENANT: OnceLock<Value> = OnceLock::new();
    match kind {
        FileKind::Operator => OPERATOR.get_or_init(|| {
            generate::<crate::syntax::OperatorFile>(
                "https://komnet.example.invalid/schema/operator.schema.json",
            )
        }),
        FileKind::Tenant => TENANT.get_or_init(|| {
            generate::<crate::syntax::TenantFile>(
                "https://komnet.example.invalid/schema/tenant.schema.json",
            )
        }),
    }
}

/// The schema as written to disk: pretty JSON with a final newline (stable across runs).
pub fn schema_text(kind: FileKind) -> String {
    let mut text = serde_json::to_string_pretty(schema(kind)).unwrap_or_default();
    text.push('\n');
    text
}

fn generate<T: JsonSchema>(id: &str) -> Value {
    let generator = SchemaGenerator::new(SchemaSettings::draft07());
    let mut root = generator.into_root_schema_for::<T>().to_value();
    if let Value::Object(map) = &mut root {
        map.insert("$id".to_owned(), Value::String(id.to_owned()));
        // TOML has no null: `Option<T>` is a key that may be left out, never a null value.
        strip_null(map);
    }
    root
}

fn strip_null(map: &mut Map<String, Value>) {
    if map.get("default").is_some_and(Value::is_null) {
        map.remove("default");
    }
    if let Some(Value::Array(types)) = map.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.remove(0);
            map.insert("type".to_owned(), only);
        }
    }
    if let Some(Value::Array(any)) = map.get("anyOf") {
        let kept: Vec<Value> = any
            .iter()
            .filter(|s| s.get("type").is_none_or(|t| t != "null"))
            .cloned()
            .collect();
        if kept.len() == 1 {
            map.remove("anyOf");
            if let Value::Object(inner) = &kept[0] {
                for (k, v) in inner {
                    map.insert(k.clone(), v.clone());
                }
            }
        }
    }
    for v in map.values_mut() {
        match v {
            Value::Object(m) => strip_null(m),
            Value::Array(list) => {
                for item in list {
                    if let Value::Object(m) = item {
                        strip_null(m);
                    }
                }
            }
            _ => {}
        }
    }
}

// ---- the value types of the schema (what a string or number in a policy file means) -------

macro_rules! schema_type {
    ($ty:ident, $name:literal, $schema:tt) => {
        #[derive(Debug)]
        pub(crate) struct $ty;
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

const NAME: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$";

schema_type!(LocalName, "Name", {
    "type": "string",
    "description": "A name: letters, digits, '-', '_' and '.', starting with a letter or digit, at most 63 characters.",
    "pattern": NAME
});
schema_type!(Kind, "Kind", {
    "type": "string",
    "description": "A segment kind the operator lists in [policy] kinds (staff, guest, iot, …).",
    "pattern": NAME
});
schema_type!(NameOrAll, "TenantOrAll", {
    "type": "string",
    "description": "A tenant, or \"*\" for every tenant.",
    "pattern": "^(\\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,62})$"
});
schema_type!(Reference, "ServiceReference", {
    "type": "string",
    "description": "A service: own or shared by its name (\"dms\"), another tenant's as TENANT/SERVICE.",
    "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,62})?$"
});
schema_type!(ReferenceOrAll, "ServiceReferenceOrAll", {
    "type": "string",
    "description": "A service (\"dms\", TENANT/SERVICE), or \"*\" for every destination.",
    "pattern": "^(\\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,62})?)$"
});
schema_type!(Address, "Address", {
    "type": "string",
    "description": "An IPv4 or IPv6 prefix without host bits (10.20.0.0/16, fd00:20::/48) or a single address (10.0.1.10).",
    "pattern": "^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$",
    "examples": ["10.20.0.0/16", "fd00:20::/48", "10.0.1.10"]
});
schema_type!(PortText, "Port", {
    "type": "string",
    "description": "PROTO/PORT: tcp/443, udp/5060-5061 (a range), tcp/* (every port), or icmp (ICMPv4 or ICMPv6 by the packet's family).",
    "pattern": "^(icmp|(tcp|udp)/(\\*|[0-9]{1,5}(-[0-9]{1,5})?))$",
    "examples": ["tcp/443", "udp/53", "tcp/8000-8099", "tcp/*", "icmp"]
});
schema_type!(VlanId, "VlanId", {
    "type": "integer",
    "description": "An 802.1Q VLAN id, 1-4094.",
    "minimum": 1,
    "maximum": 4094
});
schema_type!(AddressRange, "AddressRange", {
    "type": "string",
    "description": "An IPv4 address or an inclusive range of them: 10.30.1.7, 10.30.1.2-10.30.1.49.",
    "pattern": "^[0-9.]+( *- *[0-9.]+)?$",
    "examples": ["10.30.1.2-10.30.1.49", "10.30.1.250"]
});
schema_type!(MacAddress, "MacAddress", {
    "type": "string",
    "description": "A network card's MAC address, six hex bytes: 52:54:00:12:34:56.",
    "pattern": "^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$"
});
schema_type!(DurationText, "Duration", {
    "type": "string",
    "description": "A duration: a number and s, m, h or d (90s, 30m, 12h, 7d).",
    "pattern": "^[0-9]+[smhd]$",
    "examples": ["12h", "1d", "30m"]
});
schema_type!(Verdict, "Verdict", {
    "type": "string",
    "description": "What the test expects: allow or deny.",
    "enum": ["allow", "deny"]
});
schema_type!(TestFrom, "TestSource", {
    "type": "string",
    "description": "A segment (own, or TENANT/SEGMENT) or an address.",
    "examples": ["verwaltung", "musterstadt/verwaltung", "10.20.1.7"]
});
schema_type!(TestTo, "TestDestination", {
    "type": "string",
    "description": "SERVICE[:PROTO/PORT], SERVICE:icmp, ADDR:PROTO/PORT or [V6ADDR]:PROTO/PORT; a bare SERVICE:PORT when the service offers that port on one protocol only.",
    "examples": ["dms:tcp/443", "musterstadt/fileserver:tcp/445", "telefonanlage:icmp", "10.1.20.5:tcp/22", "[fd00:1:30::5]:tcp/445"]
});

// ---- the structural check: every unknown key and wrong type of a file at once ---------------

/// One structural problem of a file: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub(crate) span: Range<usize>,
    pub(crate) message: String,
}

/// Checks a parsed file against its schema: unknown keys (with the closest known key), values of
/// the wrong type, missing required keys. Values themselves (prefixes, ports, names) are the
/// checker's business, with better messages than a pattern could give.
pub(crate) fn structure(kind: FileKind, doc: &Spanned<DeTable<'_>>) -> Vec<Finding> {
    let root = schema(kind);
    let mut out = Vec::new();
    let doc_span = doc.span();
    check_table(root, root, doc.get_ref(), doc_span, "", &mut out);
    out.sort_by_key(|f| f.span.start);
    out
}

fn resolve<'a>(root: &'a Value, mut schema: &'a Value) -> &'a Value {
    // `$ref: "#/definitions/X"`, possibly chained or wrapped in a one-element `allOf` (how
    // draft 7 gives a reference a description of its own).
    for _ in 0..8 {
        if let Some([only]) = schema
            .get("allOf")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            schema = only;
            continue;
        }
        let Some(r) = schema.get("$ref").and_then(Value::as_str) else {
            return schema;
        };
        let Some(name) = r.strip_prefix("#/definitions/") else {
            return schema;
        };
        match root.get("definitions").and_then(|d| d.get(name)) {
            Some(s) => schema = s,
            None => return schema,
        }
    }
    schema
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "a list",
        DeValue::Table(_) => "a table",
    }
}

fn matches_type(t: &str, v: &DeValue<'_>) -> bool {
    matches!(
        (t, v),
        ("string", DeValue::String(_))
            | ("integer", DeValue::Integer(_))
            | ("number", DeValue::Integer(_) | DeValue::Float(_))
            | ("boolean", DeValue::Boolean(_))
            | ("array", DeValue::Array(_))
            | ("object", DeValue::Table(_))
    )
}

fn expected(t: &str) -> &'static str {
    match t {
        "string" => "a string (in quotes)",
        "integer" => "a whole number",
        "number" => "a number",
        "boolean" => "true or false",
        "array" => "a list [ … ]",
        "object" => "a table",
        _ => "something else",
    }
}

fn check_value(
    root: &Value,
    schema: &Value,
    value: &DeValue<'_>,
    span: Range<usize>,
    path: &str,
    out: &mut Vec<Finding>,
) {
    let schema = resolve(root, schema);
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        if !matches_type(t, value) {
            out.push(Finding {
                span,
                message: format!("`{path}` must be {}, not {}", expected(t), type_name(value)),
            });
            return;
        }
    }
    match value {
        DeValue::Table(table) => check_table(root, schema, table, span, path, out),
        DeValue::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items.iter() {
                    check_value(root, item_schema, item.get_ref(), item.span(), path, out);
                }
            }
        }
        _ => {}
    }
}

fn check_table(
    root: &Value,
    schema: &Value,
    table: &DeTable<'_>,
    span: Range<usize>,
    path: &str,
    out: &mut Vec<Finding>,
) {
    let schema = resolve(root, schema);
    let properties = schema.get("properties").and_then(Value::as_object);
    // A map keyed by names (`[segments.NAME]`): its one pattern's schema is every value's; the
    // names themselves are the checker's business (it says what makes a name valid).
    let by_pattern = schema
        .get("patternProperties")
        .and_then(Value::as_object)
        .and_then(|p| p.values().next());
    let additional = by_pattern.or_else(|| schema.get("additionalProperties"));
    for (key, value) in table.iter() {
        let name: &str = key.get_ref().as_ref();
        let key_path = if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        };
        if let Some(prop) = properties.and_then(|p| p.get(name)) {
            check_value(root, prop, value.get_ref(), value.span(), &key_path, out);
            continue;
        }
        match additional {
            Some(item @ Value::Object(_)) => {
                check_value(root, item, value.get_ref(), value.span(), &key_path, out);
            }
            Some(Value::Bool(false)) => {
                let known: Vec<&str> = properties
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                let hint = match crate::model::closest(name, known.iter().copied()) {
                    Some(near) => format!("; did you mean `{near}`?"),
                    None => format!("; known keys here: {}", known.join(", ")),
                };
                let place = if path.is_empty() {
                    "at the top of this file".to_owned()
                } else {
                    format!("in `{path}`")
                };
                out.push(Finding {
                    span: key.span(),
                    message: format!("unknown key `{name}` {place}{hint}"),
                });
            }
            _ => {}
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if table.get(r).is_none() {
                let place = if path.is_empty() {
                    "this file".to_owned()
                } else {
                    format!("`{path}`")
                };
                out.push(Finding {
                    span: span.start..span.start,
                    message: format!("{place} lacks `{r}`"),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schemas_describe_every_key_and_refuse_others() {
        let op = schema(FileKind::Operator);
        assert_eq!(op["$schema"], "http://json-schema.org/draft-07/schema#");
        assert_eq!(op["additionalProperties"], false);
        let tenant = schema(FileKind::Tenant);
        let segment = &tenant["definitions"]["SegmentDecl"];
        for key in ["kind", "site", "prefixes", "vlan", "port", "description"] {
            assert!(segment["properties"].get(key).is_some(), "{key}");
        }
        // No null anywhere: TOML cannot write one.
        assert!(!schema_text(FileKind::Tenant).contains("null"));
        assert_eq!(
            segment["properties"]["vlan"]["$ref"],
            "#/definitions/VlanId"
        );
    }

    #[test]
    fn structure_reports_every_unknown_key_and_wrong_type() {
        let text = "tenant = \"a\"\ncolour = 1\n[segments.x]\nkind = \"staff\"\nprefix = [\"10.0.0.0/8\"]\nvlan = \"10\"\n[[rule]]\nname = \"r\"\nfrom = \"x\"\nto = [\"dms\"]\n";
        let doc = DeTable::parse(text).unwrap();
        let found: Vec<String> = structure(FileKind::Tenant, &doc)
            .into_iter()
            .map(|f| format!("{}: {}", &text[f.span.clone()], f.message))
            .collect();
        assert_eq!(
            found,
            [
                "colour: unknown key `colour` at the top of this file; known keys here: dhcp, expect, groups, rule, segments, services, tenant",
                "prefix: unknown key `prefix` in `segments.x`; did you mean `prefixes`?",
                "\"10\": `segments.x.vlan` must be a whole number, not a string",
                "\"x\": `rule.from` must be a list [ … ], not a string",
            ]
        );
    }
}
