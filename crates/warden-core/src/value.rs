//! Small helpers to build regorus values directly (the policy input and the MCP part of it):
//! apart from both, so neither module imports the other for them.

use std::collections::BTreeMap;

use regorus::Value;

pub struct Obj(BTreeMap<Value, Value>);

impl Obj {
    pub fn new() -> Self {
        Self(BTreeMap::new())
    }
    pub fn set(mut self, k: &str, v: Value) -> Self {
        self.0.insert(Value::from(k), v);
        self
    }
    pub fn build(self) -> Value {
        Value::from(self.0)
    }
}

impl Default for Obj {
    fn default() -> Self {
        Self::new()
    }
}

pub fn s(v: &str) -> Value {
    Value::from(v)
}

pub fn opt_s(v: Option<&str>) -> Value {
    v.map(Value::from).unwrap_or(Value::Null)
}

pub fn opt_n(v: Option<u64>) -> Value {
    v.map(Value::from).unwrap_or(Value::Null)
}

pub fn strings<'a, I: IntoIterator<Item = &'a String>>(items: I) -> Value {
    Value::from(items.into_iter().map(|x| Value::from(x.as_str())).collect::<Vec<_>>())
}
