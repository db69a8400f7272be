//! The key-only pass: serde stops at the first unknown key, so this pass walks the document's
//! keys against the raw structs' own field lists and reports all of them.

use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

/// An unknown key: its span and the message naming what was expected.
pub(super) type UnknownKey = (Range<usize>, String);

/// Keys of a document with their spans; leaves have no children.
struct KeyTree(Vec<(Spanned<String>, KeyTree)>);

impl<'de> Deserialize<'de> for KeyTree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeyTreeVisitor)
    }
}

struct KeyTreeVisitor;

macro_rules! leaf {
    ($($f:ident: $t:ty),*) => {$(
        fn $f<E: serde::de::Error>(self, _: $t) -> Result<KeyTree, E> {
            Ok(KeyTree(Vec::new()))
        }
    )*};
}

impl<'de> serde::de::Visitor<'de> for KeyTreeVisitor {
    type Value = KeyTree;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    leaf!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<KeyTree, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(KeyTree(Vec::new()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<KeyTree, A::Error> {
        let mut keys = Vec::new();
        while let Some(k) = map.next_key::<Spanned<String>>()? {
            let v: KeyTree = map.next_value()?;
            keys.push((k, v));
        }
        Ok(KeyTree(keys))
    }
}

/// The field names serde derives for `T`, captured from its `deserialize_struct` call, so the
/// key pass cannot drift from the raw structs.
pub(super) fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Captured;
    impl fmt::Display for Captured {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("captured")
        }
    }
    impl std::error::Error for Captured {}
    impl serde::de::Error for Captured {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Captured
        }
    }
    struct Probe(&'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for &mut Probe {
        type Error = Captured;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
            Err(Captured)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Captured> {
            self.0 = fields;
            Err(Captured)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut probe = Probe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}

fn check_keys(
    tree: &KeyTree,
    fields: &[&str],
    tables: &[(&str, &'static [&'static str])],
    table: &str,
    found: &mut Vec<UnknownKey>,
) {
    for (key, sub) in &tree.0 {
        let k = key.get_ref().as_str();
        if !fields.contains(&k) {
            let expected = fields
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let place = if table.is_empty() {
                String::new()
            } else {
                format!(" in [{table}]")
            };
            found.push((
                key.span(),
                format!("unknown key `{k}`{place}; expected one of {expected}"),
            ));
        } else if let Some((_, sub_fields)) = tables.iter().find(|(t, _)| *t == k) {
            check_keys(sub, sub_fields, &[], k, found);
        }
    }
}

/// Every key of `text` that is not a field of the top-level struct (`fields`) or of the table
/// of that name (`tables`). A document that does not parse yields none: the typed pass reports it.
pub(super) fn unknown_keys(
    text: &str,
    fields: &[&str],
    tables: &[(&str, &'static [&'static str])],
) -> Vec<UnknownKey> {
    let mut found = Vec::new();
    if let Ok(tree) = toml::from_str::<KeyTree>(text) {
        check_keys(&tree, fields, tables, "", &mut found);
    }
    found
}
