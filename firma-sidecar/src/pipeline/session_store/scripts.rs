//! The Lua scripts that make every read-check-write on Redis one atomic step.
//!
//! Keys (`P` is `key_prefix`; `S` the session, `A` the agent, `K` the counter key: the action
//! class or an MCP tool's `class:name`):
//! - `P:n:<len(S)>:S:K` — calls allowed so far (string integer). The length prefix keeps
//!   `(S, K)` pairs apart whatever characters a session id holds;
//! - `P:us:S`, `P:ua:A` — usage hashes: `in`, `out`, `cost` (settled), `rt`, `rc` (reserved
//!   tokens and cost in flight), `v` (moves on every change), `r:<id>` (one reservation's
//!   `tokens,cost`);
//! - `P:rs:S`, `P:ra:A` — sorted sets of reservation ids scored by their deadline (ms, Redis
//!   clock). Every script first drops the reservations past their deadline (a sidecar that died
//!   mid-request never settles them), so a dead sidecar's reservation holds the budget for at
//!   most `reservation_ttl_seconds`.
//!
//! Times come from the Redis server's clock (`TIME`), never a sidecar's, so sidecars with skewed
//! clocks agree on deadlines. Scripts touch keys of one session and one agent, so they need a
//! single Redis primary (not Redis Cluster, whose slots would split them).

/// Shared functions, prepended to each script.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Subtracts the decimal string v from field f of hash h (Redis refuses "-0").
local function sub(h, f, v)
  if v ~= '0' then redis.call('HINCRBY', h, f, '-' .. v) end
end
-- Drops reservations of hash h listed in zset z whose deadline is before now.
local function purge(h, z, now)
  local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(dead) do
    local w = redis.call('HGET', h, 'r:' .. id)
    if w then
      local t, c = string.match(w, '^(%d+),(%d+)$')
      sub(h, 'rt', t)
      sub(h, 'rc', c)
      redis.call('HDEL', h, 'r:' .. id)
      redis.call('HINCRBY', h, 'v', 1)
    end
    redis.call('ZREM', z, id)
  end
end
local function usage(h)
  local u = redis.call('HMGET', h, 'in', 'out', 'cost', 'rt', 'rc', 'v')
  for i = 1, 6 do u[i] = tonumber(u[i] or '0') end
  return u
end
-- {count, session in/out/cost/rt/rc/v, agent in/out/cost/rt/rc/v}
local function state()
  local r = { tonumber(redis.call('GET', KEYS[1]) or '0') }
  for _, x in ipairs(usage(KEYS[2])) do r[#r + 1] = x end
  for _, x in ipairs(usage(KEYS[3])) do r[#r + 1] = x end
  return r
end
-- Keeps key k at least until unix ms `at` (0: no expiry asked).
local function keep_until(k, at)
  if at > 0 then
    local cur = redis.call('PEXPIRETIME', k)
    if cur == -1 or (cur >= 0 and cur < at) then redis.call('PEXPIREAT', k, at) end
  end
end
"#;

/// KEYS: count, session usage, agent usage, session reservations, agent reservations.
/// Returns the state ([`PRELUDE`]'s `state()`).
const READ: &str = r#"
local now = now_ms()
purge(KEYS[2], KEYS[4], now)
purge(KEYS[3], KEYS[5], now)
return state()
"#;

/// KEYS as [`READ`]. ARGV: expected count, expected session `v` and agent `v` (`-1`: usage not
/// checked), reservation id (empty: none), reserved tokens, reserved cost, reservation TTL ms,
/// unix ms until which the session's keys must be kept.
/// Returns `{1}` when counted (and reserved), else `{0, state...}` to evaluate again with.
const COMMIT: &str = r#"
local now = now_ms()
purge(KEYS[2], KEYS[4], now)
purge(KEYS[3], KEYS[5], now)
local s = state()
if s[1] ~= tonumber(ARGV[1]) or
   (ARGV[2] ~= '-1' and (s[7] ~= tonumber(ARGV[2]) or s[13] ~= tonumber(ARGV[3]))) then
  table.insert(s, 1, 0)
  return s
end
redis.call('INCR', KEYS[1])
local keep = tonumber(ARGV[8])
keep_until(KEYS[1], keep)
local id = ARGV[4]
if id ~= '' then
  local w = ARGV[5] .. ',' .. ARGV[6]
  local deadline = now + tonumber(ARGV[7])
  for i = 2, 3 do
    local h, z = KEYS[i], KEYS[i + 2]
    redis.call('HINCRBY', h, 'rt', ARGV[5])
    redis.call('HINCRBY', h, 'rc', ARGV[6])
    redis.call('HSET', h, 'r:' .. id, w)
    redis.call('HINCRBY', h, 'v', 1)
    redis.call('ZADD', z, deadline, id)
  end
  keep_until(KEYS[2], keep)
  keep_until(KEYS[4], keep)
end
return {1}
"#;

/// KEYS: session usage, agent usage, session reservations, agent reservations. ARGV:
/// reservation id (empty: none), input, output, cost to add (all `0`: a release).
/// Returns 1 when the reservation was still held, 0 when it had expired (or there was none).
const SETTLE: &str = r#"
local held = 0
local id = ARGV[1]
for i = 1, 2 do
  local h, z = KEYS[i], KEYS[i + 2]
  if id ~= '' then
    local w = redis.call('HGET', h, 'r:' .. id)
    if w then
      local t, c = string.match(w, '^(%d+),(%d+)$')
      sub(h, 'rt', t)
      sub(h, 'rc', c)
      redis.call('HDEL', h, 'r:' .. id)
      held = 1
    end
    redis.call('ZREM', z, id)
  end
  redis.call('HINCRBY', h, 'in', ARGV[2])
  redis.call('HINCRBY', h, 'out', ARGV[3])
  redis.call('HINCRBY', h, 'cost', ARGV[4])
  redis.call('HINCRBY', h, 'v', 1)
end
return held
"#;

/// KEYS: session reservations, agent reservations. ARGV: TTL ms, ids... Pushes the deadline of
/// reservations this sidecar still holds (a long streamed response) so they do not expire
/// under it.
const EXTEND: &str = r#"
local deadline = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', deadline, ARGV[i])
end
return 1
"#;

/// KEYS: count. ARGV: calls to add, unix ms to keep the key until. Replays calls allowed
/// locally while Redis was unreachable (`on_unavailable = "local_allowance"`).
const ADD_COUNT: &str = r#"
redis.call('INCRBY', KEYS[1], ARGV[1])
keep_until(KEYS[1], tonumber(ARGV[2]))
return 1
"#;

/// The compiled scripts (their SHA1 computed once; `EVALSHA` falls back to loading the
/// script after a Redis restart emptied its cache).
pub struct Scripts {
    pub read: redis::Script,
    pub commit: redis::Script,
    pub settle: redis::Script,
    pub extend: redis::Script,
    pub add_count: redis::Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        Self {
            read: with(READ),
            commit: with(COMMIT),
            settle: with(SETTLE),
            extend: with(EXTEND),
            add_count: with(ADD_COUNT),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
