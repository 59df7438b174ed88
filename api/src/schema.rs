//! Schema adjustments that make the generated CRDs acceptable to Kubernetes.
//!
//! An enum tagged by a `kind` field derives a `oneOf` whose branches each fix `kind` to one
//! value. Kubernetes wants a structural schema (every property declared once, outside any
//! `oneOf`), and kube's rewriter refuses branches that declare the same property
//! differently. Hoisting all properties and keeping `oneOf` branches of bare `required`
//! lists would also be wrong: `{kind: dirichlet, alpha: 1}` would then match two branches.
//! So the branches are folded into one object: `kind` becomes an enum of every value, and
//! what each branch required becomes a CEL rule on the object.

use schemars::Schema;
use serde_json::{json, Map, Value};

/// The tag field of the tagged enums in this crate.
const TAG: &str = "kind";

/// Folds the `oneOf` of an enum tagged by `kind` into a single structural object schema.
/// Schemas of any other shape are left as they are.
pub fn fold_kind_tagged(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let Some(Value::Array(branches)) = object.get("oneOf").cloned() else {
        return;
    };
    let mut properties = Map::new();
    let mut tags: Vec<Value> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut rules: Vec<Value> = Vec::new();
    for branch in &branches {
        let Some(tag) = branch_tag(branch) else {
            // Not an enum tagged by `kind`: leave the schema alone.
            return;
        };
        let tag_text = tag.as_str().unwrap_or_default().to_string();
        if let Some(description) = branch.get("description").and_then(Value::as_str) {
            notes.push(format!("{tag_text}: {description}"));
        }
        tags.push(tag);
        if let Some(Value::Object(props)) = branch.get("properties") {
            for (name, prop) in props {
                if name != TAG {
                    properties
                        .entry(name.clone())
                        .or_insert_with(|| prop.clone());
                }
            }
        }
        let required: Vec<&str> = branch
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|r| *r != TAG)
            .collect();
        if !required.is_empty() {
            let has: Vec<String> = required.iter().map(|r| format!("has(self.{r})")).collect();
            rules.push(json!({
                "rule": format!("self.{TAG} != '{tag_text}' || ({})", has.join(" && ")),
                "message": format!("{TAG} {tag_text} requires {}", required.join(", ")),
            }));
        }
    }
    let mut tag_schema = json!({ "type": "string", "enum": tags });
    if !notes.is_empty() {
        tag_schema["description"] = Value::String(notes.join(" "));
    }
    properties.insert(TAG.to_string(), tag_schema);

    object.remove("oneOf");
    object.insert("type".into(), json!("object"));
    object.insert("properties".into(), Value::Object(properties));
    object.insert("required".into(), json!([TAG]));
    if !rules.is_empty() {
        object.insert("x-kubernetes-validations".into(), Value::Array(rules));
    }
}

/// The single value a `oneOf` branch fixes `kind` to (`const` or a one-element `enum`).
fn branch_tag(branch: &Value) -> Option<Value> {
    let tag = branch.get("properties")?.get(TAG)?;
    if let Some(value) = tag.get("const") {
        return Some(value.clone());
    }
    match tag.get("enum")?.as_array()?.as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_fold_into_one_object_with_rules() {
        let mut schema: Schema = serde_json::from_value(json!({
            "oneOf": [
                {"type": "object", "description": "Same share each.",
                 "properties": {"kind": {"type": "string", "const": "iid"}},
                 "required": ["kind"]},
                {"type": "object",
                 "properties": {"kind": {"type": "string", "const": "dirichlet"},
                                "alpha": {"type": "number"}},
                 "required": ["kind", "alpha"]}
            ]
        }))
        .unwrap();
        fold_kind_tagged(&mut schema);
        let v = schema.as_value();
        assert!(v.get("oneOf").is_none());
        assert_eq!(v["properties"]["kind"]["enum"], json!(["iid", "dirichlet"]));
        assert_eq!(v["properties"]["alpha"]["type"], "number");
        assert_eq!(v["required"], json!(["kind"]));
        assert_eq!(
            v["x-kubernetes-validations"][0]["rule"],
            "self.kind != 'dirichlet' || (has(self.alpha))"
        );
    }

    #[test]
    fn other_schemas_are_untouched() {
        let original = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
        let mut schema: Schema = serde_json::from_value(original.clone()).unwrap();
        fold_kind_tagged(&mut schema);
        assert_eq!(schema.as_value(), &original);
    }
}
