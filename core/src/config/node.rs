//! A YAML document as a tree where every node knows its line and column.
//!
//! The YAML crate parses the text once into [`Node`]s; component configs are then deserialized
//! from nodes with [`NodeDeserializer`], which stamps each error with the position of the innermost
//! node it concerns (the offending key for an unknown field, the value for a wrong type). That is
//! how a mistake deep inside one component's config is reported at its exact line and column.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// Where a node starts: which source file, 1-based line and column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub source: usize,
    pub line: u64,
    pub column: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// The node's value as text, without positions: equal for equal configs wherever they
    /// sit in the file.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        self.write_canonical(&mut out);
        out
    }

    fn write_canonical(&self, out: &mut String) {
        use std::fmt::Write;
        match &self.value {
            Value::Null => out.push('~'),
            Value::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::UInt(u) => {
                let _ = write!(out, "{u}");
            }
            Value::Float(f) => {
                let _ = write!(out, "{f:?}");
            }
            Value::Str(s) => {
                let _ = write!(out, "{s:?}");
            }
            Value::Seq(items) => {
                out.push('[');
                for n in items {
                    n.write_canonical(out);
                    out.push(',');
                }
                out.push(']');
            }
            Value::Map(entries) => {
                out.push('{');
                for (k, v) in entries {
                    k.write_canonical(out);
                    out.push(':');
                    v.write_canonical(out);
                    out.push(',');
                }
                out.push('}');
            }
        }
    }

    pub fn new(value: Value, pos: Pos) -> Self {
        Self { value, pos }
    }

    /// The entries when this node is a mapping; `null` counts as an empty mapping.
    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            Value::Null => Some(&[]),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value under `key` when this node is a mapping with string keys.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The key node for `key`, to point an error at the line that names it.
    pub fn key_node(&self, key: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, _)| k)
    }

    /// Removes `key` from a mapping and returns its value.
    pub fn take(&mut self, key: &str) -> Option<Node> {
        let Value::Map(entries) = &mut self.value else {
            return None;
        };
        let i = entries.iter().position(|(k, _)| k.as_str() == Some(key))?;
        Some(entries.remove(i).1)
    }

    /// A short word for the node's type, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Overlays `other` onto this node: mappings merge key by key, anything else is replaced.
    pub fn merge(&mut self, other: Node) {
        match (&mut self.value, other.value) {
            (Value::Map(base), Value::Map(over)) => {
                for (k, v) in over {
                    match base.iter_mut().find(|(bk, _)| bk.value == k.value) {
                        Some((_, bv)) => bv.merge(v),
                        None => base.push((k, v)),
                    }
                }
            }
            (_, value) => {
                self.value = value;
                self.pos = other.pos;
            }
        }
    }

    /// Parses one YAML document; `source` is the index of its file in the loader's list.
    pub fn parse(text: &str, source: usize) -> Result<Node, serde_saphyr::Error> {
        // YAML 1.2 booleans only: `y`, `on` and `no` stay strings (a key named `y` is a key).
        let mut options = serde_saphyr::Options::default();
        options.strict_booleans = true;
        let raw: RawNode = serde_saphyr::from_str_with_options(text, options)?;
        let mut node = raw.0;
        node.set_source(source);
        Ok(node)
    }

    fn set_source(&mut self, source: usize) {
        self.pos.source = source;
        match &mut self.value {
            Value::Seq(items) => items.iter_mut().for_each(|n| n.set_source(source)),
            Value::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
                k.set_source(source);
                v.set_source(source);
            }),
            _ => {}
        }
    }

    /// Deserializes this node into a typed value, with positions on errors.
    pub fn deserialize<T: de::DeserializeOwned>(&self) -> Result<T, DeError> {
        T::deserialize(NodeDeserializer(self)).map_err(|e| e.or_at(self.pos))
    }
}

/// Reads a node from the YAML parser, keeping its position.
struct RawNode(Node);

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned: Spanned<RawValue> = Spanned::deserialize(d)?;
        let pos = Pos {
            source: 0,
            line: spanned.referenced.line(),
            column: spanned.referenced.column(),
        };
        Ok(RawNode(Node::new(spanned.value.0, pos)))
    }
}

struct RawValue(Value);

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor).map(RawValue)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::UInt(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(RawNode(n)) = seq.next_element()? {
            items.push(n);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some((RawNode(k), RawNode(v))) = map.next_entry()? {
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }
}

/// An error while deserializing a node, with the position of the node it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    pub message: String,
    pub pos: Option<Pos>,
}

impl DeError {
    pub fn at(message: impl Into<String>, pos: Pos) -> Self {
        Self {
            message: message.into(),
            pos: Some(pos),
        }
    }

    /// Keeps an inner, more precise position; otherwise uses `pos`.
    fn or_at(mut self, pos: Pos) -> Self {
        self.pos.get_or_insert(pos);
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            message: msg.to_string(),
            pos: None,
        }
    }
}

/// A serde deserializer over a borrowed [`Node`].
pub struct NodeDeserializer<'a>(pub &'a Node);

impl<'de> de::Deserializer<'de> for NodeDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0;
        let result = match &node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::UInt(u) => visitor.visit_u64(*u),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqAccess(items.iter())),
            Value::Map(entries) => visitor.visit_map(MapAccess {
                entries: entries.iter(),
                value: None,
            }),
        };
        result.map_err(|e| e.or_at(node.pos))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    // `key:` with nothing after it means "all defaults", as `key: {}` does.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0.value {
            Value::Null => visitor
                .visit_map(MapAccess {
                    entries: [].iter(),
                    value: None,
                })
                .map_err(|e| e.or_at(self.0.pos)),
            _ => self.deserialize_any(visitor),
        }
    }

    // YAML users write `version: 1` and mean a string; accept scalars where a string is expected.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = match &self.0.value {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(f) => f.to_string(),
            _ => return self.deserialize_any(visitor),
        };
        visitor
            .visit_string(text)
            .map_err(|e: DeError| e.or_at(self.0.pos))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let node = self.0;
        let result = match &node.value {
            Value::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => {
                visitor.visit_enum(EnumAccess(&entries[0]))
            }
            _ => Err(DeError::at(
                format!(
                    "expected a variant name or a one-key mapping, found {}",
                    node.type_name()
                ),
                node.pos,
            )),
        };
        result.map_err(|e| e.or_at(node.pos))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit
        unit_struct seq tuple tuple_struct identifier ignored_any
    }
}

struct SeqAccess<'a>(std::slice::Iter<'a, Node>);

impl<'de> de::SeqAccess<'de> for SeqAccess<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.0.next() {
            Some(node) => seed
                .deserialize(NodeDeserializer(node))
                .map(Some)
                .map_err(|e| e.or_at(node.pos)),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct MapAccess<'a> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    value: Option<&'a Node>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        seed.deserialize(NodeDeserializer(key))
            .map(Some)
            .map_err(|e| e.or_at(key.pos))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let node = self
            .value
            .take()
            .ok_or_else(|| <DeError as de::Error>::custom("value requested before key"))?;
        seed.deserialize(NodeDeserializer(node))
            .map_err(|e| e.or_at(node.pos))
    }
}

struct EnumAccess<'a>(&'a (Node, Node));

impl<'de, 'a> de::EnumAccess<'de> for EnumAccess<'a> {
    type Error = DeError;
    type Variant = NodeDeserializer<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), DeError> {
        let (key, value) = self.0;
        let v = seed
            .deserialize(NodeDeserializer(key))
            .map_err(|e| e.or_at(key.pos))?;
        Ok((v, NodeDeserializer(value)))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDeserializer<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        de::Deserialize::deserialize(self)
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_text_leaves_positions_out_and_tells_values_apart() {
        let a = Node::parse("r:\n  targets: [\"x:1\"]\n  interval: 1s\n", 0).unwrap();
        let moved = Node::parse("\n\nr: { targets: [\"x:1\"],   interval: 1s }\n", 0).unwrap();
        let other = Node::parse("r: { targets: [\"x:1\"], interval: 2s }\n", 0).unwrap();
        let typed = Node::parse("r: { targets: [\"x:1\"], interval: \"1s\", n: 1 }\n", 0).unwrap();
        let r = |n: &Node| n.get("r").unwrap().canonical();
        assert_eq!(r(&a), r(&moved));
        assert_ne!(r(&a), r(&other));
        assert_ne!(r(&a), r(&typed));
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        port: u16,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        inner: Inner,
        #[serde(default)]
        mode: Option<Mode>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    fn parse(text: &str) -> Node {
        Node::parse(text, 0).expect("valid yaml")
    }

    #[test]
    fn positions_are_one_based() {
        let n = parse("a:\n  b: [1, x]\n");
        let b = n.get("a").unwrap().get("b").unwrap();
        assert_eq!((b.pos.line, b.pos.column), (2, 6));
        let Value::Seq(items) = &b.value else {
            panic!()
        };
        assert_eq!(items[1].value, Value::Str("x".into()));
        assert_eq!((items[1].pos.line, items[1].pos.column), (2, 10));
    }

    #[test]
    fn typed_deserialization() {
        let n = parse("name: 7\ninner:\n  port: 80\n  tags: [a]\nmode: slow\n");
        let o: Outer = n.deserialize().unwrap();
        assert_eq!(o.name, "7");
        assert_eq!(
            o.inner,
            Inner {
                port: 80,
                tags: vec!["a".into()]
            }
        );
        assert_eq!(o.mode, Some(Mode::Slow));
    }

    #[test]
    fn unknown_field_points_at_the_key() {
        let n = parse("name: x\ninner:\n  port: 80\n  prot: 1\n");
        let e = n.deserialize::<Outer>().unwrap_err();
        assert!(e.message.contains("unknown field `prot`"), "{}", e.message);
        let p = e.pos.unwrap();
        assert_eq!((p.line, p.column), (4, 3));
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let n = parse("name: x\ninner:\n  port: 70000\n");
        let e = n.deserialize::<Outer>().unwrap_err();
        assert_eq!(e.pos.map(|p| (p.line, p.column)), Some((3, 9)));
        let n = parse("name: x\ninner:\n  port: 1\nmode: warp\n");
        let e = n.deserialize::<Outer>().unwrap_err();
        assert!(
            e.message.contains("unknown variant `warp`"),
            "{}",
            e.message
        );
        assert_eq!(e.pos.map(|p| p.line), Some(4));
    }

    #[test]
    fn missing_field_points_at_the_mapping() {
        let n = parse("name: x\ninner:\n  tags: []\n");
        let e = n.deserialize::<Outer>().unwrap_err();
        assert!(e.message.contains("missing field `port`"), "{}", e.message);
        assert_eq!(e.pos.map(|p| p.line), Some(3));
    }

    #[test]
    fn null_is_an_empty_mapping() {
        #[derive(Deserialize, Default, Debug, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        struct AllDefault {
            x: u32,
        }
        let n = parse("c:\n");
        let c: AllDefault = n.get("c").unwrap().deserialize().unwrap();
        assert_eq!(c, AllDefault::default());
    }

    #[test]
    fn merge_overlays_mappings() {
        let mut a = parse("r:\n  x: {p: 1, q: 2}\ns: 1\n");
        a.merge(parse("r:\n  x: {q: 3}\n  y: {}\n"));
        let x = a.get("r").unwrap().get("x").unwrap();
        assert_eq!(x.get("p").unwrap().deserialize::<u64>(), Ok(1));
        assert_eq!(x.get("q").unwrap().deserialize::<u64>(), Ok(3));
        assert!(a.get("r").unwrap().get("y").is_some());
        assert!(a.get("s").is_some());
    }
}
