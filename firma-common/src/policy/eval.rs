use super::compile::CompiledPolicies;
use cedar_policy::{Context, Entities, Entity, EntityId, EntityUid, Request, RestrictedExpression};
use cedar_policy_core::ast::{self as cedar_ast, Value};
use smol_str::SmolStr;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

/// A value taken from a request body for `context.request` (see the sidecar's mapping rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    String(String),
    Long(i64),
    Bool(bool),
}

/// `context.mcp`: one MCP JSON-RPC message on an endpoint a mapping rule marks as MCP
/// (runtime only; see the sidecar's `docs/mcp.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpContext {
    /// The JSON-RPC method (`tools/call`, ...).
    pub method: String,
    /// Tool or prompt name, or resource URI.
    pub name: Option<String>,
    /// The arguments the mapping rule declares, typed (`context.mcp.arguments`).
    pub arguments: BTreeMap<String, AttrValue>,
}

fn attr_expr(v: &AttrValue) -> RestrictedExpression {
    match v {
        AttrValue::String(s) => RestrictedExpression::new_string(s.clone()),
        AttrValue::Long(n) => RestrictedExpression::new_long(*n),
        AttrValue::Bool(b) => RestrictedExpression::new_bool(*b),
    }
}

/// [`attr_expr`] as the value Cedar's evaluator makes of it.
fn attr_value(v: &AttrValue) -> Value {
    match v {
        AttrValue::String(s) => Value::from(s.as_str()),
        AttrValue::Long(n) => Value::from(*n),
        AttrValue::Bool(b) => Value::from(*b),
    }
}

/// A record of typed attributes as a Cedar value.
fn attrs_value(attrs: &BTreeMap<String, AttrValue>) -> Value {
    Value::record(attrs.iter().map(|(k, v)| (k.as_str(), attr_value(v))), None)
}

impl McpContext {
    /// [`McpContext::record`] (known arguments) as the value Cedar's evaluator makes of it.
    fn value(&self) -> Value {
        let mut fields = BTreeMap::<SmolStr, Value>::new();
        fields.insert("method".into(), Value::from(self.method.as_str()));
        fields.insert("arguments".into(), attrs_value(&self.arguments));
        if let Some(n) = &self.name {
            fields.insert("name".into(), Value::from(n.as_str()));
        }
        Value::record_arc(Arc::new(fields), None)
    }

    /// `unknown_arguments`: `arguments` is a Cedar unknown (list-time decisions, see
    /// [`CompiledPolicies::could_allow`]).
    fn record(&self, unknown_arguments: bool) -> Result<RestrictedExpression, String> {
        let args = if unknown_arguments {
            RestrictedExpression::new_unknown("mcp_arguments")
        } else {
            RestrictedExpression::new_record(
                self.arguments
                    .iter()
                    .map(|(k, v)| (k.clone(), attr_expr(v))),
            )
            .map_err(|e| e.to_string())?
        };
        let mut fields = vec![
            (
                "method".to_string(),
                RestrictedExpression::new_string(self.method.clone()),
            ),
            ("arguments".to_string(), args),
        ];
        if let Some(n) = &self.name {
            fields.push((
                "name".to_string(),
                RestrictedExpression::new_string(n.clone()),
            ));
        }
        RestrictedExpression::new_record(fields).map_err(|e| e.to_string())
    }
}

/// Token usage so far, for `context.session` / `context.agent`.
///
/// `input_tokens`, `output_tokens` and `cost_nano_usd` are settled (responses that ended);
/// `reserved_*` is what requests still in flight may spend (their reservations). Cedar's
/// `tokens_used` and `cost_usd` are the sums of both, so a budget written on them holds under
/// concurrency; `tokens_reserved` / `cost_reserved_usd` show the in-flight part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Cost in nano-USD (shown to Cedar as a `decimal`, rounded down to 1/10,000 USD).
    pub cost_nano_usd: i64,
    /// Tokens reserved by requests in flight.
    pub reserved_tokens: i64,
    /// Cost in nano-USD reserved by requests in flight.
    pub reserved_cost_nano_usd: i64,
}

/// nano-USD as a Cedar `decimal` (rounded down to 1/10,000 USD).
fn decimal(nano: i64) -> RestrictedExpression {
    let c = nano / 100_000;
    RestrictedExpression::new_decimal(format!(
        "{}{}.{:04}",
        if c < 0 { "-" } else { "" },
        c.unsigned_abs() / 10_000,
        c.unsigned_abs() % 10_000
    ))
}

impl UsageTotals {
    /// Settled plus reserved tokens (Cedar's `tokens_used`).
    pub fn tokens_used(&self) -> i64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.reserved_tokens)
    }

    fn record(&self) -> RestrictedExpression {
        RestrictedExpression::new_record([
            (
                "tokens_used".to_string(),
                RestrictedExpression::new_long(self.tokens_used()),
            ),
            (
                "input_tokens".to_string(),
                RestrictedExpression::new_long(self.input_tokens),
            ),
            (
                "output_tokens".to_string(),
                RestrictedExpression::new_long(self.output_tokens),
            ),
            (
                "cost_usd".to_string(),
                decimal(
                    self.cost_nano_usd
                        .saturating_add(self.reserved_cost_nano_usd),
                ),
            ),
            (
                "tokens_reserved".to_string(),
                RestrictedExpression::new_long(self.reserved_tokens),
            ),
            (
                "cost_reserved_usd".to_string(),
                decimal(self.reserved_cost_nano_usd),
            ),
        ])
        .unwrap_or_else(|_| RestrictedExpression::new_long(0))
    }
}

/// Everything a Firma decision feeds to Cedar. Issuance and Stage 2 fill the same fields
/// (see `policies/firma.cedarschema` for what each side puts where).
#[derive(Debug, Clone, Copy)]
pub struct EvalRequest<'a> {
    /// Principal: `Firma::Agent::"<agent_id>"`.
    pub agent_id: &'a str,
    /// Action class: `Firma::Action::"<action>"`.
    pub action: &'a str,
    /// Resource id: `Firma::Resource::"<resource_id>"` (host+path at runtime, scope at issuance).
    pub resource_id: &'a str,
    /// `resource.host`, absent at issuance.
    pub host: Option<&'a str>,
    /// `resource.path`, absent at issuance.
    pub path: Option<&'a str>,
    /// `context.action_count`.
    pub action_count: i64,
    /// `context.session_id`.
    pub session_id: &'a str,
    /// `context.method` (HTTP method, or `ISSUE`).
    pub method: &'a str,
    /// `context.request`: attributes the mapping rule extracted from the body (runtime only,
    /// and only for rules that extract).
    pub request: Option<&'a BTreeMap<String, AttrValue>>,
    /// `context.session` and `context.agent`: token usage so far (runtime only).
    pub usage: Option<(UsageTotals, UsageTotals)>,
    /// `context.mcp`: the MCP message (runtime, MCP endpoints only).
    pub mcp: Option<&'a McpContext>,
}

/// A Cedar decision, with the policies that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalResult {
    pub allowed: bool,
    /// Ids of the policies that decided: the permits that allowed, or the forbids that denied.
    /// Empty on a default deny (nothing permitted).
    pub determining_policies: Vec<String>,
    /// Evaluation errors (a policy that errors does not apply; the request itself is invalid
    /// when the action class is unknown). Any entry here with `allowed == false` explains why.
    pub errors: Vec<String>,
}

impl EvalResult {
    pub(super) fn error(msg: String) -> Self {
        Self {
            allowed: false,
            determining_policies: Vec::new(),
            errors: vec![msg],
        }
    }
}

/// The entity store of each resource seen, built once: it depends only on the resource
/// (`id`, `host`, `path`), and building it (entity, attribute values, hierarchy closure) was a
/// quarter of Stage 2's time. Bounded: when [`EntityCache::CAPACITY`] resources are held it
/// starts over, so a client inventing paths costs what it did before the cache, no memory.
#[derive(Default)]
pub(super) struct EntityCache(Mutex<HashMap<String, Arc<Entities>>>);

impl EntityCache {
    const CAPACITY: usize = 4096;

    fn get_or_build(
        &self,
        key: String,
        build: impl FnOnce() -> Result<Entities, String>,
    ) -> Result<Arc<Entities>, String> {
        if let Some(e) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(e.clone());
        }
        let built = Arc::new(build()?);
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= Self::CAPACITY {
            map.clear();
        }
        map.insert(key, built.clone());
        Ok(built)
    }
}

impl CompiledPolicies {
    /// Evaluates `req`. Never fails open: an unknown action class, an id Cedar cannot hold or a
    /// request the schema rejects yields `allowed: false` with the cause in `errors`.
    pub fn evaluate(&self, req: &EvalRequest<'_>) -> EvalResult {
        let Some(action) = self.by_action.get(req.action) else {
            return EvalResult::error(format!("unknown action class `{}`", req.action));
        };
        if let Some(why) = &action.invalid {
            return EvalResult::error(why.clone());
        }
        let principal =
            EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(req.agent_id));
        let names = super::partition::Names::Of(req.mcp.and_then(|m| m.name.as_deref()));
        let parts = action.partitions(&principal, names);
        let with_usage = parts.clone().any(|p| p.reads_usage);
        match self.build(req, principal, &action.uid, with_usage) {
            Ok((request, entities)) => {
                super::partition::authorize(&self.authorizer, &request, &entities, parts)
            }
            Err(msg) => EvalResult::error(msg),
        }
    }

    /// Whether some value of `context.mcp.arguments` could make Cedar allow `req` (its
    /// `mcp` arguments are ignored): Cedar's partial evaluation with the arguments unknown.
    /// False when a forbid holds whatever the arguments, or no permit can hold; true when a
    /// permit holds or may hold (a forbid that depends on the arguments does not hide it).
    /// This is how `tools/list` answers are filtered (the sidecar's `docs/mcp.md`).
    pub fn could_allow(&self, req: &EvalRequest<'_>) -> bool {
        let Some(action) = self.by_action.get(req.action) else {
            return false;
        };
        if action.invalid.is_some() || req.mcp.is_none() {
            return false;
        }
        let principal =
            EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(req.agent_id));
        let parts = action.partitions(&principal, super::partition::Names::All);
        // Without the usage records: their `decimal` values are extension calls, which make
        // Cedar treat the whole context as not projectable (then even `context.mcp.name` would
        // stay unknown). Policies on token usage do not take part in list-time decisions.
        let Ok((request, entities)) = self.build_with(req, principal, &action.uid, false, true)
        else {
            return false;
        };
        let mut permit_possible = false;
        for part in parts {
            let resp = self
                .authorizer
                .is_authorized_partial(&request, &part.policies, &entities);
            let satisfied_forbid = resp
                .definitely_satisfied()
                .any(|p| p.effect() == cedar_policy::Effect::Forbid);
            if satisfied_forbid {
                return false;
            }
            permit_possible |= resp
                .may_be_determining()
                .any(|p| p.effect() == cedar_policy::Effect::Permit);
        }
        permit_possible
    }

    /// The Cedar request and entity store for `req`.
    pub(super) fn build(
        &self,
        req: &EvalRequest<'_>,
        principal: EntityUid,
        action: &EntityUid,
        with_usage: bool,
    ) -> Result<(Request, Arc<Entities>), String> {
        self.build_with(req, principal, action, with_usage, false)
    }

    fn build_with(
        &self,
        req: &EvalRequest<'_>,
        principal: EntityUid,
        action: &EntityUid,
        with_usage: bool,
        unknown_arguments: bool,
    ) -> Result<(Request, Arc<Entities>), String> {
        let uid = |ty: &cedar_policy::EntityTypeName, id: &str| {
            EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
        };
        let action = action.clone();
        let resource = uid(&self.resource_type, req.resource_id);
        // `\0` cannot occur in a host or path that reached Cedar, so the key is unambiguous.
        let key = format!(
            "{}\0{}\0{}",
            req.resource_id,
            req.host.unwrap_or("\u{1}"),
            req.path.unwrap_or("\u{1}")
        );
        let entities = self.entities.get_or_build(key, || {
            let mut attrs = HashMap::with_capacity(2);
            if let Some(host) = req.host {
                attrs.insert("host".into(), RestrictedExpression::new_string(host.into()));
            }
            if let Some(path) = req.path {
                attrs.insert("path".into(), RestrictedExpression::new_string(path.into()));
            }
            let resource_entity =
                Entity::new(resource.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?;
            // The agent has no attributes and no parents: absent from the store it evaluates
            // the same (`has` false, `in` only itself), one entity less to build per request.
            Entities::from_entities([resource_entity], None).map_err(|e| e.to_string())
        })?;
        let context = if unknown_arguments {
            self.context_pairs(req, with_usage, true)?
        } else {
            self.context_values(req, with_usage)?
        };
        // The shape was validated once per action class (`compile`); ids of enumerated entity
        // types can only be checked here.
        // (An unknown is not a value the schema can check: the shape was checked at compile.)
        let schema = (self.validate_each_request && !unknown_arguments).then_some(&self.schema);
        let request = Request::new(principal, action, resource, context, schema)
            .map_err(|e| e.to_string())?;
        Ok((request, entities))
    }

    /// The context as restricted expressions, evaluated by Cedar into its value (or, with
    /// `unknown_arguments`, into a residual). The reference for [`Self::context_values`].
    pub(super) fn context_pairs(
        &self,
        req: &EvalRequest<'_>,
        with_usage: bool,
        unknown_arguments: bool,
    ) -> Result<Context, String> {
        let mut pairs = vec![
            (
                "action_count".to_string(),
                RestrictedExpression::new_long(req.action_count),
            ),
            (
                "session_id".to_string(),
                RestrictedExpression::new_string(req.session_id.into()),
            ),
            (
                "method".to_string(),
                RestrictedExpression::new_string(req.method.into()),
            ),
        ];
        if let Some(attrs) = req.request {
            let fields = attrs.iter().map(|(k, v)| (k.clone(), attr_expr(v)));
            pairs.push((
                "request".to_string(),
                RestrictedExpression::new_record(fields).map_err(|e| e.to_string())?,
            ));
        }
        if let Some(m) = req.mcp {
            pairs.push(("mcp".to_string(), m.record(unknown_arguments)?));
        }
        if let Some((session, agent)) = req.usage.filter(|_| with_usage) {
            pairs.push(("session".to_string(), session.record()));
            pairs.push(("agent".to_string(), agent.record()));
        }
        Context::from_pairs(pairs).map_err(|e| e.to_string())
    }

    /// The same context as [`Self::context_pairs`] (known arguments), built as values: Cedar's
    /// restricted-expression evaluator (an expression tree built, then walked into the same
    /// values) was half of an MCP decision's time. Only the usage records' `decimal`s, which
    /// are extension values, still go through it. Tested equal to the reference.
    pub(super) fn context_values(
        &self,
        req: &EvalRequest<'_>,
        with_usage: bool,
    ) -> Result<Context, String> {
        let mut ctx = BTreeMap::<SmolStr, Value>::new();
        ctx.insert("action_count".into(), Value::from(req.action_count));
        ctx.insert("session_id".into(), Value::from(req.session_id));
        ctx.insert("method".into(), Value::from(req.method));
        if let Some(attrs) = req.request {
            ctx.insert("request".into(), attrs_value(attrs));
        }
        if let Some(m) = req.mcp {
            ctx.insert("mcp".into(), m.value());
        }
        if let Some((session, agent)) = req.usage.filter(|_| with_usage) {
            let usage = Context::from_pairs([
                ("session".to_string(), session.record()),
                ("agent".to_string(), agent.record()),
            ])
            .map_err(|e| e.to_string())?;
            match usage.as_ref() {
                cedar_ast::Context::Value(records) => {
                    ctx.extend(records.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                cedar_ast::Context::RestrictedResidual(_) => {
                    return Err("usage records are not values".into());
                }
            }
        }
        Ok(Context::from(cedar_ast::Context::Value(Arc::new(ctx))))
    }
}
