//! The compiled policy set, partitioned so that a request is evaluated only against the
//! policies whose scope can match it: by action class (as before) and, within a class, by the
//! entity the principal scope names. A multi-tenant bundle has one or more
//! `permit (principal == Firma::Agent::"tenant-N", …)` per tenant; without the principal index
//! every request evaluated every tenant's policies (10,000 tenants: ~7.5 ms per request).
//!
//! Why the answer stays exactly Cedar's over the whole set:
//!
//! * Cedar evaluates a policy as `scope && conditions`, short-circuited: a policy whose scope
//!   does not match the request is neither satisfied nor erroring, so leaving it out changes
//!   neither the decision, nor the determining policies, nor the errors.
//! * Firma never puts the principal in the entity store (eval.rs: it has no attributes and no
//!   parents), so `principal in E` and `principal is T in E` hold only when the principal *is*
//!   `E`, like `principal == E`. All three are indexed under `E`; only unconstrained and
//!   `principal is T` scopes are evaluated for every principal. (Were agents ever given
//!   parents, the lookup would have to take every ancestor's partition too.)
//! * The partitions of one request are disjoint, and Cedar's answer over their union is a
//!   function of each partition's answer ([`merge`]): deny if any forbid is satisfied (the
//!   determining policies are all satisfied forbids), else allow if any permit is (all
//!   satisfied permits), else deny with none; errors are the union.
//!
//! * Within a partition, policies whose `when` starts with
//!   `context has mcp && context.mcp has name && context.mcp.name == "<n>"` (the idiom of
//!   `docs/mcp.md`) can hold only for MCP messages naming `<n>`: for any other request that
//!   prefix is false without error (the scope never errors, the two `has` tests cannot, and
//!   they guard the comparison). A request naming `<n>` is evaluated against the partition's
//!   other policies plus those of `<n>`, in one set ([`Partition::for_name`]); one naming
//!   nothing, or a name no policy tests, against the other policies only. List-time decisions
//!   ([`super::CompiledPolicies::could_allow`], partial evaluation) use every policy.
//!
//! Memory: each policy is held once per action class it can apply to, as before; the index
//! adds one small `PolicySet` per (action class, principal entity) that some policy names, and
//! per MCP name a set of the partition's unnamed policies plus that name's (cheap clones).

use super::eval::EvalResult;
use cedar_policy::{
    Authorizer, Decision, Entities, EntityUid, Policy, PolicySet, PrincipalConstraint, Request,
};
use std::collections::HashMap;

/// The policies one action class is evaluated against.
pub(super) struct ActionPolicies {
    pub(super) uid: EntityUid,
    /// Why the schema rejects requests for this action (checked once, with representative
    /// values: validation is by type), if it does.
    pub(super) invalid: Option<String>,
    /// Policies any principal may satisfy (unconstrained or `principal is T` scope).
    pub(super) shared: Partition,
    /// Policies whose principal scope names an entity (`==`, `in`, `is T in`), by that entity.
    pub(super) by_principal: HashMap<EntityUid, Partition>,
}

/// A set of policies evaluated together.
#[derive(Default)]
pub(super) struct Partition {
    /// The policies that do not test an MCP name (see the module doc), or for
    /// [`Partition::all`] every policy.
    pub(super) policies: PolicySet,
    pub(super) len: usize,
    /// Some policy may read `context.session` / `context.agent`; when none of a request's
    /// partitions can, the usage records are not built (two Cedar `decimal` values, a third
    /// of Stage 2's time).
    pub(super) reads_usage: bool,
    /// By MCP name: `policies` plus the policies that can only hold for messages naming it.
    by_name: HashMap<String, Partition>,
    /// Every policy, when some test an MCP name (list-time decisions).
    all: Option<Box<Partition>>,
}

/// Which of a partition's MCP-name sets a request is evaluated against.
#[derive(Debug, Clone, Copy)]
pub(super) enum Names<'a> {
    /// The request's MCP name (`None`: not an MCP message, or one without a name).
    Of(Option<&'a str>),
    /// Every policy (partial evaluation, where nothing is skipped).
    All,
}

impl Partition {
    /// Adds `policy` (its id is unique in the bundle, so adding to a subset cannot fail).
    pub(super) fn add(&mut self, policy: Policy, reads_usage: bool) {
        if self.policies.add(policy).is_ok() {
            self.len += 1;
            self.reads_usage |= reads_usage;
        }
    }

    /// Files `policy` under the MCP name it tests, if it tests one, else with the others.
    fn file(&mut self, policy: Policy, reads_usage: bool) {
        let name = mcp_name_of(&policy);
        if name.is_some() || self.all.is_some() {
            let all = self.all.get_or_insert_with(|| {
                let mut all = Partition::default();
                for p in self.policies.policies() {
                    all.add(p.clone(), false);
                }
                all.reads_usage = self.reads_usage;
                Box::new(all)
            });
            all.add(policy.clone(), reads_usage);
        }
        match name {
            Some(n) => {
                let shared = &self.policies;
                let (len, usage) = (self.len, self.reads_usage);
                let named = self.by_name.entry(n).or_insert_with(|| {
                    let mut named = Partition::default();
                    for p in shared.policies() {
                        named.add(p.clone(), false);
                    }
                    debug_assert_eq!(named.len, len);
                    named.reads_usage = usage;
                    named
                });
                named.add(policy, reads_usage);
            }
            None => {
                for named in self.by_name.values_mut() {
                    named.add(policy.clone(), reads_usage);
                }
                self.add(policy, reads_usage);
            }
        }
    }

    /// The set a request naming `names` is evaluated against (see the module doc).
    pub(super) fn for_name(&self, names: Names<'_>) -> &Partition {
        match names {
            Names::Of(Some(n)) => self.by_name.get(n).unwrap_or(self),
            Names::Of(None) => self,
            Names::All => self.all.as_deref().unwrap_or(self),
        }
    }
}

/// The MCP name a policy can only hold for: its first condition is a `when` whose conjuncts
/// start with `context has mcp`, `context.mcp has name`, `context.mcp.name == "<n>"` (either
/// side of `==`). Read from Cedar's JSON form of the policy; anything else is `None`.
fn mcp_name_of(policy: &Policy) -> Option<String> {
    use serde_json::{Value, json};
    // Cedar builds the JSON form by parsing the policy's text again: that was half the time of
    // compiling 10,000 tenant policies. A policy whose text never says `mcp` cannot test the
    // name (and `None` only ever costs speed: the policy is then evaluated for every name).
    if !policy.to_string().contains("mcp") {
        return None;
    }
    let est = policy.to_json().ok()?;
    let first = est.get("conditions")?.as_array()?.first()?;
    if first.get("kind")? != "when" {
        return None;
    }
    let mut conjuncts = Vec::new();
    let mut stack = vec![first.get("body")?];
    // Cedar's `a && b && c` is `(a && b) && c`: flattened left to right, in evaluation order.
    while let Some(e) = stack.pop() {
        match e.get("&&") {
            Some(and) => {
                stack.push(and.get("right")?);
                stack.push(and.get("left")?);
            }
            None => conjuncts.push(e),
        }
        if conjuncts.len() == 3 {
            break;
        }
    }
    let context = json!({"Var": "context"});
    let mcp = json!({".": {"left": context, "attr": "mcp"}});
    let name = json!({".": {"left": mcp, "attr": "name"}});
    let has = |left: &Value, attr: &str| json!({"has": {"left": left, "attr": attr}});
    let [a, b, eq] = conjuncts.as_slice() else {
        return None;
    };
    if **a != has(&context, "mcp") || **b != has(&mcp, "name") {
        return None;
    }
    let eq = eq.get("==")?;
    let (l, r) = (eq.get("left")?, eq.get("right")?);
    let lit = if *l == name {
        r
    } else if *r == name {
        l
    } else {
        return None;
    };
    lit.get("Value")?.as_str().map(str::to_owned)
}

impl ActionPolicies {
    pub(super) fn new(uid: EntityUid, invalid: Option<String>) -> Self {
        Self {
            uid,
            invalid,
            shared: Partition::default(),
            by_principal: HashMap::new(),
        }
    }

    /// Files `policy` under the partition its principal scope selects.
    pub(super) fn add(&mut self, policy: Policy, reads_usage: bool) {
        match principal_key(&policy) {
            Some(key) => self
                .by_principal
                .entry(key)
                .or_default()
                .file(policy, reads_usage),
            None => self.shared.file(policy, reads_usage),
        }
    }

    /// The partitions a request by `principal` naming `names` is evaluated against: the
    /// shared one and the principal's own, each only when it holds a policy.
    pub(super) fn partitions<'a>(
        &'a self,
        principal: &EntityUid,
        names: Names<'_>,
    ) -> impl Iterator<Item = &'a Partition> + Clone + use<'a> {
        let own = self.by_principal.get(principal).map(|p| p.for_name(names));
        [Some(self.shared.for_name(names)), own]
            .into_iter()
            .flatten()
            .filter(|p| p.len > 0)
    }

    /// Number of MCP-name sets over all partitions (for tests).
    #[cfg(test)]
    pub(super) fn named_sets(&self) -> usize {
        self.shared.by_name.len()
            + self
                .by_principal
                .values()
                .map(|p| p.by_name.len())
                .sum::<usize>()
    }

    /// Number of principal partitions (for tests and the docs' memory figures).
    #[cfg(test)]
    pub(super) fn principal_partitions(&self) -> usize {
        self.by_principal.len()
    }
}

/// The entity a policy's principal scope names, if it names one: the policy can apply only to
/// that principal (see the module doc for `in`).
fn principal_key(policy: &Policy) -> Option<EntityUid> {
    match policy.principal_constraint() {
        PrincipalConstraint::Eq(e)
        | PrincipalConstraint::In(e)
        | PrincipalConstraint::IsIn(_, e) => Some(e),
        PrincipalConstraint::Any | PrincipalConstraint::Is(_) => None,
    }
}

/// Cedar over the union of `parts` (disjoint), from one authorization per partition.
pub(super) fn authorize<'a>(
    authorizer: &Authorizer,
    request: &Request,
    entities: &Entities,
    parts: impl Iterator<Item = &'a Partition>,
) -> EvalResult {
    let mut permits = Vec::new();
    let mut forbids = Vec::new();
    let mut errors = Vec::new();
    for part in parts {
        let resp = authorizer.is_authorized(request, &part.policies, entities);
        // Cedar's reasons are the satisfied forbids when any is satisfied (then the decision is
        // Deny), else the satisfied permits (then Allow); a Deny with no reason satisfied none.
        let reasons = resp.diagnostics().reason().map(ToString::to_string);
        match resp.decision() {
            Decision::Allow => permits.extend(reasons),
            Decision::Deny => forbids.extend(reasons),
        }
        errors.extend(resp.diagnostics().errors().map(ToString::to_string));
    }
    merge(permits, forbids, errors)
}

/// The whole set's answer from the satisfied permits and forbids of its partitions.
fn merge(permits: Vec<String>, forbids: Vec<String>, mut errors: Vec<String>) -> EvalResult {
    let allowed = forbids.is_empty() && !permits.is_empty();
    let mut determining = if forbids.is_empty() { permits } else { forbids };
    determining.sort();
    // Cedar reports errors in its own set's iteration order; sorted, the answer is stable.
    errors.sort();
    EvalResult {
        allowed,
        determining_policies: determining,
        errors,
    }
}

#[cfg(test)]
mod mcp_name_tests {
    use super::mcp_name_of;
    use cedar_policy::Policy;

    fn name(text: &str) -> Option<String> {
        mcp_name_of(&Policy::parse(None, text).expect("policy"))
    }

    #[test]
    fn the_mcp_name_is_read_only_from_the_guarded_shape() {
        let guard = "context has mcp && context.mcp has name";
        assert_eq!(
            name(&format!(
                "permit (principal, action, resource) when {{ {guard} && context.mcp.name == \"search\" }};"
            )),
            Some("search".into())
        );
        assert_eq!(
            name(&format!(
                "forbid (principal, action, resource) when {{ {guard} && \"rm\" == context.mcp.name && context.x }};"
            )),
            Some("rm".into())
        );
        // Other shapes, and policies that never mention MCP (the fast path), hold for every name.
        assert_eq!(
            name(&format!(
                "permit (principal, action, resource) unless {{ {guard} && context.mcp.name == \"a\" }};"
            )),
            None
        );
        assert_eq!(
            name("permit (principal == Firma::Agent::\"t-1\", action, resource);"),
            None
        );
    }
}
