use super::NAMESPACE;
use super::bundle::PolicyBundle;
use super::error::{PolicyDiagnostic, PolicyError, diagnose};
use super::partition::ActionPolicies;
use cedar_policy::{
    ActionConstraint, Authorizer, Context, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;

/// A bundle parsed and strictly validated against its schema, ready to evaluate.
///
/// Cheap to share behind an `Arc`; evaluation takes `&self`. The work that does not depend on
/// the request is done here, once per bundle: the policies are partitioned by action class and
/// principal (a request is evaluated only against those whose action and principal scopes can
/// match it, see [`super::partition`]), and the request
/// shape Firma builds (principal and resource types, context types) is checked against the
/// schema once per action class instead of on every request.
pub struct CompiledPolicies {
    pub(super) schema: Schema,
    /// Per action class: its policies, by principal, and whether the request shape validates.
    pub(super) by_action: HashMap<String, ActionPolicies>,
    /// The schema declares enumerated entity types, whose ids are checked per request: then
    /// each request is validated against the schema as it is built.
    pub(super) validate_each_request: bool,
    pub(super) authorizer: Authorizer,
    pub(super) agent_type: EntityTypeName,
    pub(super) resource_type: EntityTypeName,
    action_classes: BTreeSet<String>,
    policy_ids: Vec<String>,
    version: String,
    /// Resource entities already built, by resource (see [`super::eval`]).
    pub(super) entities: super::eval::EntityCache,
    /// Every policy in one set: the reference the partitioned evaluation is tested against.
    #[cfg(test)]
    pub(super) all: PolicySet,
}

impl std::fmt::Debug for CompiledPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPolicies")
            .field("version", &self.version)
            .field("policy_ids", &self.policy_ids)
            .field("action_classes", &self.action_classes)
            .finish()
    }
}

/// `Firma::<name>` as a Cedar type name.
fn type_name(name: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(&format!("{NAMESPACE}::{name}")).map_err(|e| {
        PolicyError::Invalid(vec![PolicyDiagnostic {
            file: "schema".into(),
            line: None,
            message: format!("entity type {NAMESPACE}::{name}: {e}"),
        }])
    })
}

impl PolicyBundle {
    /// Parses every file and validates the whole set strictly against the schema.
    ///
    /// Policy ids: the `@id("…")` annotation when present, else `<file stem>:<index>` (index of
    /// the policy in its file, from 0). Errors name the file and, where Cedar gives one, the
    /// line; all problems in all files are reported at once.
    pub fn compile(&self) -> Result<CompiledPolicies, PolicyError> {
        let schema = compile_schema(&self.schema)?;
        let mut diags = Vec::new();
        let mut policies = PolicySet::new();
        // policy id -> index of its file in `self.files`, to locate validation errors.
        let mut origin: HashMap<PolicyId, usize> = HashMap::new();
        let mut policy_ids = Vec::new();
        for (file_idx, file) in self.files.iter().enumerate() {
            let set = match PolicySet::from_str(&file.content) {
                Ok(set) => set,
                Err(errs) => {
                    diags.extend(errs.iter().map(|e| diagnose(&file.name, &file.content, e)));
                    continue;
                }
            };
            if set.templates().next().is_some() {
                diags.push(PolicyDiagnostic {
                    file: file.name.clone(),
                    line: None,
                    message: "policy templates (?principal/?resource) are not supported".into(),
                });
                continue;
            }
            let stem = file.name.strip_suffix(".cedar").unwrap_or(&file.name);
            // The parser names policies `policy0`, `policy1`, … in source order.
            let mut parsed: Vec<(usize, &cedar_policy::Policy)> = set
                .policies()
                .map(|p| {
                    let n = p.id().to_string().trim_start_matches("policy").parse();
                    (n.unwrap_or(usize::MAX), p)
                })
                .collect();
            parsed.sort_by_key(|(n, _)| *n);
            for (n, policy) in parsed {
                let id = match policy.annotation("id") {
                    Some(id) => id.to_string(),
                    None => format!("{stem}:{n}"),
                };
                let pid = PolicyId::new(&id);
                if let Some(other) = origin.get(&pid) {
                    diags.push(PolicyDiagnostic {
                        file: file.name.clone(),
                        line: None,
                        message: format!(
                            "policy id `{id}` is already used in {}",
                            self.files[*other].name
                        ),
                    });
                    continue;
                }
                if let Err(e) = policies.add(policy.new_id(pid.clone())) {
                    diags.push(PolicyDiagnostic {
                        file: file.name.clone(),
                        line: None,
                        message: e.to_string(),
                    });
                    continue;
                }
                origin.insert(pid, file_idx);
                policy_ids.push(id);
            }
        }
        if !diags.is_empty() {
            return Err(PolicyError::Invalid(diags));
        }
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        for e in result.validation_errors() {
            let diag = match origin.get(e.policy_id()).and_then(|i| self.files.get(*i)) {
                Some(file) => diagnose(&file.name, &file.content, e),
                None => diagnose("<bundle>", "", e),
            };
            diags.push(diag);
        }
        if !diags.is_empty() {
            return Err(PolicyError::Invalid(diags));
        }
        let action_type = type_name("Action")?;
        let agent_type = type_name("Agent")?;
        let resource_type = type_name("Resource")?;
        let action_classes: BTreeSet<String> = schema
            .actions()
            .filter(|a| a.type_name() == &action_type)
            .map(|a| a.id().unescaped().to_string())
            .collect();
        // With action groups, `action in [G]` may match classes not named in it: such policies
        // go to every class.
        let has_groups = schema.action_groups().next().is_some();
        let mut by_action: HashMap<String, ActionPolicies> = action_classes
            .iter()
            .map(|class| {
                let uid = EntityUid::from_type_name_and_id(
                    action_type.clone(),
                    EntityId::new(class.as_str()),
                );
                let invalid = shape_error(&schema, &agent_type, &uid, &resource_type);
                (class.clone(), ActionPolicies::new(uid, invalid))
            })
            .collect();
        // One pass over the policies: each goes to the classes its action scope can match, and
        // within a class to the partition its principal scope selects (see `partition`).
        for p in policies.policies() {
            let usage = reads_usage(&p.to_string());
            let constraint = p.action_constraint();
            for action in by_action.values_mut() {
                let applies = match &constraint {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(a) => *a == action.uid,
                    ActionConstraint::In(list) => has_groups || list.contains(&action.uid),
                };
                if applies {
                    action.add(p.clone(), usage);
                }
            }
        }
        Ok(CompiledPolicies {
            schema,
            by_action,
            validate_each_request: self.schema.contains("enum"),
            authorizer: Authorizer::new(),
            agent_type,
            resource_type,
            action_classes,
            policy_ids,
            version: self.version.clone(),
            entities: Default::default(),
            #[cfg(test)]
            all: policies,
        })
    }
}

/// Context attributes other than the usage records; any other use of `context` may need them.
const CHEAP_CONTEXT: [&str; 5] = ["action_count", "session_id", "method", "request", "mcp"];

/// Whether a policy may read the usage records (`context.session`, `context.agent`), judged
/// from its Cedar text and erring towards yes: every occurrence of the word `context` counts
/// unless it is `context.<a>` or `context has <a>` with `<a>` in [`CHEAP_CONTEXT`] (so
/// `context` used whole, indexed, or inside a string literal all count as reading them).
pub(super) fn reads_usage(text: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let word_at = |s: &str| -> String { s.chars().take_while(|c| ident(*c)).collect() };
    let mut from = 0;
    while let Some(i) = text[from..].find("context") {
        let start = from + i;
        let end = start + "context".len();
        from = end;
        let before = text[..start].chars().next_back();
        let after = text[end..].chars().next();
        if before.is_some_and(ident) || after.is_some_and(ident) {
            continue;
        }
        let rest = text[end..].trim_start();
        let attr = if let Some(r) = rest.strip_prefix('.') {
            word_at(r.trim_start())
        } else if let Some(r) = rest.strip_prefix("has")
            && !r.starts_with(ident)
        {
            let r = r.trim_start();
            match r.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or_default().to_string(),
                None => word_at(r),
            }
        } else {
            return true;
        };
        if !CHEAP_CONTEXT.contains(&attr.as_str()) {
            return true;
        }
    }
    false
}

/// Whether the schema accepts the request Firma builds for `action` (types only; the values
/// are representative), and why not.
fn shape_error(
    schema: &Schema,
    agent: &EntityTypeName,
    action: &EntityUid,
    resource: &EntityTypeName,
) -> Option<String> {
    let uid = |t: &EntityTypeName| EntityUid::from_type_name_and_id(t.clone(), EntityId::new("x"));
    let context = Context::from_pairs([
        (
            "action_count".to_string(),
            RestrictedExpression::new_long(0),
        ),
        (
            "session_id".to_string(),
            RestrictedExpression::new_string(String::new()),
        ),
        (
            "method".to_string(),
            RestrictedExpression::new_string(String::new()),
        ),
    ])
    .map_err(|e| e.to_string());
    let checked = context.and_then(|c| {
        Request::new(uid(agent), action.clone(), uid(resource), c, Some(schema))
            .map_err(|e| e.to_string())
    });
    checked.err()
}

/// Parses the schema and checks it declares the entity types Firma builds requests from.
fn compile_schema(text: &str) -> Result<Schema, PolicyError> {
    let schema = match Schema::from_cedarschema_str(text) {
        Ok((schema, _warnings)) => schema,
        Err(e) => return Err(PolicyError::Invalid(vec![diagnose("schema", text, &e)])),
    };
    let mut missing = Vec::new();
    for name in ["Agent", "Resource"] {
        let t = type_name(name)?;
        if !schema.entity_types().any(|have| *have == t) {
            missing.push(t.to_string());
        }
    }
    if !missing.is_empty() {
        return Err(PolicyError::Invalid(vec![PolicyDiagnostic {
            file: "schema".into(),
            line: None,
            message: format!(
                "schema must declare entity types {} (Firma builds every request from them)",
                missing.join(", ")
            ),
        }]));
    }
    Ok(schema)
}

impl CompiledPolicies {
    /// Action ids (`Firma::Action::"…"`) the schema declares: the valid action classes.
    pub fn action_classes(&self) -> &BTreeSet<String> {
        &self.action_classes
    }

    /// Whether `class` is a declared action class.
    pub fn is_action_class(&self, class: &str) -> bool {
        self.action_classes.contains(class)
    }

    /// Ids of every policy, in file then source order.
    pub fn policy_ids(&self) -> &[String] {
        &self.policy_ids
    }

    /// Version of the bundle this was compiled from.
    pub fn version(&self) -> &str {
        &self.version
    }
}
