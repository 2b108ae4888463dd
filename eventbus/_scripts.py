"""Every Lua script eventbus runs, as source constants.

Rules (RELIABILITY.md §5.7): key names come only from ``KEYS``; every loop is
bounded by its arguments; writes come before the ack, because Redis does not
roll a script back when a later command fails (an error after the ack would
lose the event, an error before it leaves the event pending and retried). The
scripts are called through redis-py ``Script`` objects: ``EVALSHA``, reloaded
transparently on ``NOSCRIPT`` (after a restart or ``SCRIPT FLUSH``).

No ``#!lua`` shebang: Redis 6.2 (still supported) does not understand it.

``docs/wire-format.md`` documents these from this module.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACK_PUBLISH",
    "DEAD_LETTER",
    "LEASE_RELEASE",
    "LEASE_RENEW",
    "REPLAY_DEAD_LETTERS",
    "TRIM_ACKED",
]

DEAD_LETTER: Final = """
-- Move one pending entry of a consumer group to the dead-letter stream.
-- KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3] dead-letter count hash
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] dead-letter MAXLEN (approximate),
-- ARGV[4..] field, value pairs of the dead-letter entry
-- returns the dead-letter entry id, or false if the entry is no longer pending
-- (another consumer acked or dead-lettered it first: nothing is written twice)
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return false
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return id
"""

ACK_PUBLISH: Final = """
-- Publish a handler's result events and ack its input, atomically (chaining).
-- KEYS[1] input stream, KEYS[2] output stream
-- ARGV[1] group, ARGV[2] input entry id, ARGV[3] output MAXLEN ('' for none),
-- ARGV[4..] the output events, one after another, each as n (its number of
-- field and value items, at most 64) followed by those n items
-- returns the output entry ids, or false if the input is no longer pending
-- (claimed and acked elsewhere: its outputs were published there, not again here)
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return false
end
-- Check every count before writing anything: a script is not rolled back.
local starts = {}
local i = 4
for _ = 1, #ARGV do
  if i > #ARGV then
    break
  end
  local n = tonumber(ARGV[i])
  if n == nil or n < 2 or n > 64 or n % 2 ~= 0 or i + n > #ARGV then
    return redis.error_reply('ERR ACK_PUBLISH: bad field count at ARGV[' .. i .. ']')
  end
  starts[#starts + 1] = i
  i = i + n + 1
end
local ids = {}
for k = 1, #starts do
  local s = starts[k]
  local n = tonumber(ARGV[s])
  if ARGV[3] == '' then
    ids[k] = redis.call('XADD', KEYS[2], '*', unpack(ARGV, s + 1, s + n))
  else
    ids[k] = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, s + 1, s + n))
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return ids
"""

TRIM_ACKED: Final = """
-- Trim a stream without removing anything a consumer group still needs: an entry
-- some group has pending, or has not been delivered to it yet.
-- KEYS[1] stream
-- ARGV[1] MAXLEN ('' for none), ARGV[2] MINID from the retention age ('' for none),
-- ARGV[3] probe limit: most entries read to decide a MAXLEN trim
-- returns {entries trimmed, 1 if a trim was held back by a lagging group else 0}
local key = KEYS[1]
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
if redis.call('EXISTS', key) == 0 then
  return {0, 0}
end
-- safe: the smallest id any group still needs (nil: no group needs anything)
local safe = nil
local groups = redis.call('XINFO', 'GROUPS', key)
for _, group in ipairs(groups) do
  local name, pending, last
  for i = 1, #group, 2 do
    local field = group[i]
    if field == 'name' then
      name = group[i + 1]
    elseif field == 'pending' then
      pending = group[i + 1]
    elseif field == 'last-delivered-id' then
      last = group[i + 1]
    end
  end
  local need
  if pending > 0 then
    need = redis.call('XPENDING', key, name)[2]
  else
    local ms, seq = parse(last)
    need = string.format('%d-%d', ms, seq + 1)
  end
  if safe == nil or less(need, safe) then
    safe = need
  end
end
local trimmed = 0
local held = 0
if ARGV[2] ~= '' then
  local cut = ARGV[2]
  if safe ~= nil and less(safe, cut) then
    cut = safe
    held = 1
  end
  trimmed = trimmed + redis.call('XTRIM', key, 'MINID', '~', cut)
end
if ARGV[1] ~= '' then
  local maxlen = tonumber(ARGV[1])
  if redis.call('XLEN', key) > maxlen then
    if safe == nil then
      trimmed = trimmed + redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
    else
      local probe = math.min(maxlen, tonumber(ARGV[3]))
      local needed = #redis.call('XRANGE', key, safe, '+', 'COUNT', probe)
      if needed < probe then
        -- fewer than maxlen needed entries: the MAXLEN cut lies below safe
        trimmed = trimmed + redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
      else
        held = 1
        if needed >= maxlen then
          trimmed = trimmed + redis.call('XTRIM', key, 'MINID', '~', safe)
        end
      end
    end
  end
end
return {trimmed, held}
"""

REPLAY_DEAD_LETTERS: Final = """
-- Publish dead letters back into their topic (same event id) and remove them.
-- KEYS[1] dead-letter stream, KEYS[2] stream
-- ARGV[1..] dead-letter entry ids (at most 100 per call)
-- returns {replayed, skipped}: skipped entries have no envelope (undecodable
-- input, kept for inspection) or no longer exist
local replayed, skipped = 0, 0
for i = 1, #ARGV do
  local entries = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  local env, eid = nil, nil
  if #entries == 1 then
    local fields = entries[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == 'env' then
        env = fields[j + 1]
      elseif fields[j] == 'id' then
        eid = fields[j + 1]
      end
    end
  end
  if env ~= nil and eid ~= nil then
    redis.call('XADD', KEYS[2], '*', 'id', eid, 'env', env, 'redriven_from', ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    replayed = replayed + 1
  else
    skipped = skipped + 1
  end
end
return {replayed, skipped}
"""

LEASE_RENEW: Final = """
-- Renew a group member's lease on its consumer name, or take it again if it lapsed.
-- KEYS[1] lease key
-- ARGV[1] the member's token, ARGV[2] time to live in ms
-- returns {1, token}: renewed; {2, token}: it had lapsed (the member stalled or was
-- cut off past the TTL) and nobody took it, so it is the member's again;
-- {0, holder}: another member holds the name now (nothing is written)
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, holder}
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {2, ARGV[1]}
end
return {0, holder}
"""

LEASE_RELEASE: Final = """
-- Delete a group member's lease on its consumer name, if it still holds it.
-- KEYS[1] lease key
-- ARGV[1] the member's token
-- returns 1 if deleted, 0 if the lease is not the member's (lapsed, or taken by
-- another member: that one's lease is left alone)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
