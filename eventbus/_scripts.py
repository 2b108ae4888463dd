"""Every Lua script eventbus runs, as source constants.

Rules (RELIABILITY.md §5.7): key names come only from ``KEYS``; every loop is
bounded by its arguments; writes come before the ack, because Redis does not
roll a script back when a later command fails (an error after the ack would
lose the event, an error before it leaves the event pending and retried). The
scripts are called through redis-py ``Script`` objects: ``EVALSHA``, reloaded
transparently on ``NOSCRIPT`` (after a restart or ``SCRIPT FLUSH``).

No ``#!lua`` shebang: Redis 6.2 (still supported) does not understand it.

``docs/wire-format.md`` documents these from this module.

Why one module past 600 lines: it is the server-side code, one concept, kept
together so that ``tests/test_lua_audit.py`` audits and pins every script in one
place and a reviewer reads each beside its siblings (the release function of
delayed events is in three of them, on purpose: a script cannot import another).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACK_PUBLISH",
    "CONSUMER_REMOVE",
    "DEAD_LETTER",
    "DELAYED_CANCEL",
    "DELAYED_RELEASE",
    "DELAYED_SCHEDULE",
    "LEASE_RELEASE",
    "LEASE_RENEW",
    "QUEUE_ACK",
    "QUEUE_ADMIT",
    "QUEUE_DEAD",
    "QUEUE_ENQUEUE",
    "QUEUE_GIVE_BACK",
    "QUEUE_HEARTBEAT",
    "QUEUE_REAP",
    "QUEUE_REQUEUE_DEAD",
    "QUEUE_RETRY",
    "QUEUE_SCHEDULE",
    "QUEUE_TAKE",
    "RECURRING_DECLARE",
    "RECURRING_FIRE",
    "REPLAY_DEAD_LETTERS",
    "RETRY_DEFER",
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

CONSUMER_REMOVE: Final = """
-- Remove a consumer from a group, only if nothing is pending under its name and
-- no member holds its name's lease (a member leaving cleanly, after it released
-- its lease; or a stale consumer that a live member removes). XGROUP DELCONSUMER
-- drops the consumer's pending entries: the XPENDING check before it, in the same
-- script, is what makes the removal lose nothing.
-- KEYS[1] stream, KEYS[2] the lease key of the consumer's name
-- ARGV[1] group, ARGV[2] consumer
-- returns 1 if removed, 0 if it has pending entries or a lease (left alone)
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


# -- delayed events ---------------------------------------------------------------------
#
# A topic's schedule: a sorted set (member the event id, score the due time in ms by
# the Redis server's clock) and a hash (field the event id, value the event as it
# will be released). The value is "l" + a live envelope (PUBLISH), or "d" followed
# by netstrings ("<length>:<bytes>"): the stream's MAXLEN ("" for none), then the
# entry's field and value items (XADD). An index (member the topic, score its
# earliest due time) lets schedulers find due topics, and a wake channel tells
# them when the earliest due time of all moved earlier.


DELAYED_SCHEDULE: Final = """
-- Schedule events for one due time, or release them at once if it is already past.
-- Safe to run twice (a client's retry after a lost reply): a scheduled event is
-- found by its id, an event released at once leaves a mark for 10 minutes.
-- KEYS[1] schedule (zset), KEYS[2] schedule data (hash), KEYS[3] stream,
-- KEYS[4] index (zset of topics), KEYS[4 + i] the released-at-once mark of event i
-- ARGV[1] 'in' (ARGV[2] ms from now) or 'at' (ARGV[2] epoch ms), ARGV[3] topic,
-- ARGV[4] live channel, ARGV[5] wake channel, then per event i: its id and the
-- event (see above)
-- returns {due ms, server now ms, then per event: stream id or '' (released at
-- once), 1 if scheduled by this call else 0}
local function release_one(blob, channel, due)
  local d = string.format('%d', due)
  if string.sub(blob, 1, 1) == 'l' then
    -- the envelope is a JSON object: its due time goes in before the closing brace
    redis.call('PUBLISH', channel, string.sub(blob, 2, -2) .. ',"due":' .. d .. '}')
    return
  end
  local items = {}
  local pos = 2
  local len = #blob
  for _ = 1, 1 + 2 * 256 do -- MAXLEN, then at most 256 fields (Limits caps them lower)
    if pos > len then
      break
    end
    local colon = string.find(blob, ':', pos, true)
    local n = tonumber(string.sub(blob, pos, colon - 1))
    items[#items + 1] = string.sub(blob, colon + 1, colon + n)
    pos = colon + n + 1
  end
  local maxlen = table.remove(items, 1)
  items[#items + 1] = 't'
  items[#items + 1] = d
  if maxlen ~= '' then
    return redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', unpack(items))
  end
  return redis.call('XADD', KEYS[3], '*', unpack(items))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due
if ARGV[1] == 'in' then
  due = now + tonumber(ARGV[2])
else
  due = tonumber(ARGV[2])
end
local out = {due, now}
local first = nil
local added = false
for i = 1, (#ARGV - 5) / 2 do
  local id = ARGV[4 + 2 * i]
  local blob = ARGV[5 + 2 * i]
  local held = redis.call('ZSCORE', KEYS[1], id)
  if held then
    out[#out + 1] = ''
    out[#out + 1] = 1
  elseif due <= now then
    local done = redis.call('GET', KEYS[4 + i])
    if not done then
      done = release_one(blob, ARGV[4], due) or ''
      redis.call('SET', KEYS[4 + i], done, 'PX', 600000)
    end
    out[#out + 1] = done
    out[#out + 1] = 0
  else
    if not added then
      first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
      added = true
    end
    redis.call('HSET', KEYS[2], id, blob)
    redis.call('ZADD', KEYS[1], due, id)
    out[#out + 1] = ''
    out[#out + 1] = 1
  end
end
if added then
  local cur = redis.call('ZSCORE', KEYS[4], ARGV[3])
  if not cur or due < tonumber(cur) then
    redis.call('ZADD', KEYS[4], due, ARGV[3])
  end
  if #first == 0 or due < tonumber(first[2]) then
    -- Only a hint to sleeping schedulers (they look anyway): an ACL that refuses
    -- the channel must not refuse the event.
    redis.pcall('PUBLISH', ARGV[5], due)
  end
end
return out
"""

DELAYED_RELEASE: Final = """
-- Release a topic's (or a queue level's) due events, at most ARGV[3] of them: each
-- written to its topic or queue first, then removed from the schedule (a failure
-- never loses one: the events written before it are removed, it and those after
-- it stay). The batch's data is read with one HMGET and removed with one HDEL and
-- one ZREM (per 1000 ids) after the writes: per-event calls cost most of the time.
-- KEYS[1] schedule (zset), KEYS[2] schedule data (hash), KEYS[3] stream (or the
-- queue level's list), KEYS[4] index (zset of topics), KEYS[5] a queue's level-0
-- list (a topic: KEYS[3] again)
-- ARGV[1] index member, ARGV[2] live channel, ARGV[3] batch limit, ARGV[4] the type
-- KEYS[3] must have ('stream' or 'list'), ARGV[5] a queue's nudge marker
-- returns {released, server now ms, next due ms or -1, missing data}
local find, sub, format, unpack = string.find, string.sub, string.format, unpack
-- items: one event's XADD arguments (reused); lengths: the length prefixes read, as
-- numbers (tonumber is the dearest step of the parse)
local items, lengths = {}, {}
local function release_one(blob, channel, d)
  local kind = sub(blob, 1, 1)
  if kind == 'l' or kind == 'q' then
    -- the envelope is a JSON object: its due time goes in before the closing brace
    local env = sub(blob, 2, -2) .. ',"due":' .. d .. '}'
    if kind == 'l' then
      redis.call('PUBLISH', channel, env)
    else
      redis.call('LPUSH', KEYS[3], env)
    end
    return
  end
  local colon = find(blob, ':', 2, true)
  local s = sub(blob, 2, colon - 1)
  local n = lengths[s]
  if not n then
    n = tonumber(s)
    lengths[s] = n
  end
  local maxlen = sub(blob, colon + 1, colon + n)
  local pos = colon + n + 1
  local len = #blob
  local k = 0
  for _ = 1, 2 * 256 do -- at most 256 fields (Limits caps them lower)
    if pos > len then
      break
    end
    colon = find(blob, ':', pos, true)
    s = sub(blob, pos, colon - 1)
    n = lengths[s]
    if not n then
      n = tonumber(s)
      lengths[s] = n
    end
    k = k + 1
    items[k] = sub(blob, colon + 1, colon + n)
    pos = colon + n + 1
  end
  items[k + 1] = 't'
  items[k + 2] = d
  if maxlen ~= '' then
    return redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', unpack(items, 1, k + 2))
  end
  return redis.call('XADD', KEYS[3], '*', unpack(items, 1, k + 2))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ready = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[3]))
local kind = redis.call('TYPE', KEYS[3])['ok']
if #ready > 0 and kind ~= 'none' and kind ~= ARGV[4] then
  return redis.error_reply('WRONGTYPE eventbus: ' .. KEYS[3] .. ' is a ' .. kind
    .. ', not a ' .. ARGV[4] .. '; the due events stay scheduled')
end
local ids, dues = {}, {}
for i = 1, #ready, 2 do
  ids[#ids + 1] = ready[i]
  dues[#dues + 1] = ready[i + 1]
end
local blobs = {}
for a = 1, #ids, 1000 do -- 1000 arguments per variadic command: far below unpack's limit
  local b = math.min(a + 999, #ids)
  local got = redis.call('HMGET', KEYS[2], unpack(ids, a, b))
  for j = a, b do
    blobs[j] = got[j - a + 1]
  end
end
local released, missing, done = 0, 0, 0
local last, d -- the due time, formatted once for a run of equal ones
-- Lua's pcall catches a failed write (or a blob that does not parse): the events
-- written before it still leave the schedule, then the error is returned.
local ok, err = pcall(function()
  for j = 1, #ids do
    local blob = blobs[j]
    if blob then
      if dues[j] ~= last then
        last = dues[j]
        d = format('%d', tonumber(last))
      end
      release_one(blob, ARGV[2], d)
      released = released + 1
    else
      missing = missing + 1
    end
    done = j
  end
end)
-- the events written (or without data) leave the schedule; a failed one stays
for a = 1, done, 1000 do
  local b = math.min(a + 999, done)
  redis.call('HDEL', KEYS[2], unpack(ids, a, b))
  redis.call('ZREM', KEYS[1], unpack(ids, a, b))
end
if not ok then
  return redis.error_reply(type(err) == 'table' and err.err or tostring(err))
end
if released > 0 and KEYS[5] ~= KEYS[3] and redis.call('LLEN', KEYS[5]) == 0 then
  -- urgent jobs released while idle workers block on level 0: wake one
  redis.call('LPUSH', KEYS[5], ARGV[5])
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return {released, now, -1, missing}
end
redis.call('ZADD', KEYS[4], nxt[2], ARGV[1])
return {released, now, tonumber(nxt[2]), missing}
"""

DELAYED_CANCEL: Final = """
-- Remove one scheduled event (or queue job) if it is still pending. Safe to run
-- twice (a client's retry after a lost reply): the run that removes it leaves a
-- tombstone holding the call's token for 10 minutes, and a run of the same call
-- that finds it answers as the first run did; another call's token answers 0.
-- KEYS[1] schedule (zset), KEYS[2] schedule data (hash), KEYS[3] index (zset),
-- KEYS[4] the event's tombstone (string), KEYS[5] a queue's job ids (hash; absent
-- for a topic)
-- ARGV[1] event id, ARGV[2] index member (topic, or queue level), ARGV[3] the
-- call's token
-- returns 1 if it was pending and this call removed it, else 0 (released, never
-- scheduled, or removed by another call)
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  if redis.call('GET', KEYS[4]) == ARGV[3] then
    return 1
  end
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], ARGV[3], 'PX', 600000)
if #KEYS > 4 then
  redis.call('HDEL', KEYS[5], ARGV[1])
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
else
  redis.call('ZADD', KEYS[3], nxt[2], ARGV[2])
end
return 1
"""

RECURRING_DECLARE: Final = """
-- Declare a recurring event: the same definition again changes nothing; another
-- one replaces it (and its next occurrence).
-- KEYS[1] next occurrences (zset), KEYS[2] definitions (hash)
-- ARGV[1] name, ARGV[2] definition (canonical JSON), ARGV[3] next occurrence (ms),
-- ARGV[4] wake channel
-- returns 1 if written, 0 if the same definition was already there
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.pcall('PUBLISH', ARGV[4], ARGV[3]) -- a hint only, as in DELAYED_SCHEDULE
return 1
"""

RECURRING_FIRE: Final = """
-- Release the occurrences of a recurring event that a scheduler decided on, if no
-- other scheduler did first: a compare-and-set on the next occurrence it read.
-- KEYS[1] next occurrences (zset), KEYS[2] definitions (hash), KEYS[3] the
-- topic's stream, KEYS[4] last releases (hash)
-- ARGV[1] name, ARGV[2] the next occurrence read (ms), ARGV[3] sha1 of the
-- definition read, ARGV[4] the next occurrence after these (ms), ARGV[5] live
-- channel, then per occurrence: its time (ms) and the event (as DELAYED_SCHEDULE's)
-- returns the number released, or -1 if another scheduler (or a new definition)
-- came first: nothing written
local function release_one(blob, channel, due)
  local d = string.format('%d', due)
  if string.sub(blob, 1, 1) == 'l' then
    -- the envelope is a JSON object: its due time goes in before the closing brace
    redis.call('PUBLISH', channel, string.sub(blob, 2, -2) .. ',"due":' .. d .. '}')
    return
  end
  local items = {}
  local pos = 2
  local len = #blob
  for _ = 1, 1 + 2 * 256 do -- MAXLEN, then at most 256 fields (Limits caps them lower)
    if pos > len then
      break
    end
    local colon = string.find(blob, ':', pos, true)
    local n = tonumber(string.sub(blob, pos, colon - 1))
    items[#items + 1] = string.sub(blob, colon + 1, colon + n)
    pos = colon + n + 1
  end
  local maxlen = table.remove(items, 1)
  items[#items + 1] = 't'
  items[#items + 1] = d
  if maxlen ~= '' then
    return redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', unpack(items))
  end
  return redis.call('XADD', KEYS[3], '*', unpack(items))
end
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not cur or tonumber(cur) ~= tonumber(ARGV[2]) then
  return -1
end
local def = redis.call('HGET', KEYS[2], ARGV[1])
if not def or redis.sha1hex(def) ~= ARGV[3] then
  return -1
end
local kind = redis.call('TYPE', KEYS[3])['ok']
if #ARGV > 5 and kind ~= 'none' and kind ~= 'stream' then
  return redis.error_reply('WRONGTYPE eventbus: ' .. KEYS[3] .. ' is a ' .. kind
    .. ', not a stream; the occurrence stays due')
end
local released = 0
for i = 6, #ARGV - 1, 2 do
  release_one(ARGV[i + 1], ARGV[5], tonumber(ARGV[i]))
  released = released + 1
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
if released > 0 then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[#ARGV - 1])
end
return released
"""

RETRY_DEFER: Final = """
-- Note in Redis when a group's pending entry is to be retried (a long backoff):
-- a member that claims it before then waits instead of running it early.
-- KEYS[1] the group's retry times (zset)
-- ARGV[1] entry id, ARGV[2] backoff (ms)
-- returns the retry time, epoch ms by the server's clock
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], at, ARGV[1])
return at
"""

# -- work queues ------------------------------------------------------------------------
# A queue's jobs wait in one list per priority level (LPUSH in, taken from the right:
# FIFO per level). A worker moves each job it takes into its own processing list in
# the same step (LMOVE, BLMOVE), and removes it when the job is settled: a worker
# that dies leaves its jobs there, and a live one puts them back (QUEUE_REAP).

QUEUE_ENQUEUE: Final = """
-- Enqueue jobs on one priority level of a work queue. A job whose id is already
-- registered (waiting, scheduled or running) is not enqueued again.
-- KEYS[1] job ids (hash), KEYS[2] the level's list, KEYS[3] the level-0 list
-- ARGV[1] nudge marker, then per job: its id ('' for a job that is not
-- deduplicated) and the job
-- returns per job 1 (enqueued) or 0 (its id was already there)
local out = {}
local pushed = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if id == '' or redis.call('HSETNX', KEYS[1], id, 1) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[i + 1])
    out[#out + 1] = 1
    pushed = pushed + 1
  else
    out[#out + 1] = 0
  end
end
if pushed > 0 and KEYS[2] ~= KEYS[3] and redis.call('LLEN', KEYS[3]) == 0 then
  -- Idle workers block on the level-0 list only: wake one for the urgent job.
  redis.call('LPUSH', KEYS[3], ARGV[1])
end
return out
"""

QUEUE_TAKE: Final = """
-- Take up to ARGV[1] jobs for one worker, the most urgent level first, FIFO within
-- a level, each moved into the worker's processing list as it is taken; within
-- the queue's rate limit, if it has one (a sliding window of start times).
-- KEYS[1] processing list, KEYS[2] rate log (zset), KEYS[3] stalled counts (hash),
-- KEYS[4] counters (hash), KEYS[5] the level-0 list, KEYS[6..] the lists of levels
-- 1 and up
-- ARGV[1] most jobs to take, ARGV[2] rate limit ('' for none), ARGV[3] rate window
-- (ms), ARGV[4] prefix unique to this call (rate-log members), ARGV[5] nudge
-- marker, ARGV[6] '1' to first drop one nudge from the processing list
-- returns {ms until the rate limit lets one more start (0: not limited), then per
-- job taken: the job, its level, how many times a dead worker had held it; a job
-- held before by a dead worker is always the last}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[6] == '1' then
  redis.call('LREM', KEYS[1], 1, ARGV[5])
end
local want = tonumber(ARGV[1])
local limited = ARGV[2] ~= ''
local window = tonumber(ARGV[3])
if limited then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  local room = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[2])
  if room < want then
    want = room
  end
end
local out = {0}
local taken = 0
local stalled = redis.call('EXISTS', KEYS[3]) == 1
-- A job that a dead worker held is taken last in its call: the worker runs it
-- alone, so that if it kills its worker again, no other job shares the blame.
local suspect = false
for level = #KEYS - 4, 1, -1 do
  local list = KEYS[4 + level]
  for _ = 1, tonumber(ARGV[1]) + 1 do
    if taken >= want or suspect then
      break
    end
    local job = redis.call('LMOVE', list, KEYS[1], 'RIGHT', 'LEFT')
    if not job then
      break
    end
    if job == ARGV[5] then
      redis.call('LPOP', KEYS[1]) -- a nudge, not a job
    else
      taken = taken + 1
      out[#out + 1] = job
      out[#out + 1] = level - 1
      local held = 0
      if stalled then
        held = tonumber(redis.call('HGET', KEYS[3], redis.sha1hex(job)) or '0')
      end
      out[#out + 1] = held
      suspect = held > 0
    end
  end
end
if taken > 0 then
  redis.call('HINCRBY', KEYS[4], 'started', taken)
end
if limited then
  for i = 1, tonumber(ARGV[1]) do
    if i > taken then
      break
    end
    redis.call('ZADD', KEYS[2], now, ARGV[4] .. ':' .. i)
  end
  if taken > 0 then
    redis.call('PEXPIRE', KEYS[2], window)
  end
  if taken < tonumber(ARGV[1]) then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if #oldest > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
      out[1] = math.max(tonumber(oldest[2]) + window - now, 1)
    end
  end
end
if #KEYS > 5 and redis.call('LLEN', KEYS[5]) == 0 then
  -- Jobs left on an urgent level and nothing on level 0, where idle workers
  -- block: wake one of them.
  for level = 2, #KEYS - 4 do
    if redis.call('LLEN', KEYS[4 + level]) > 0 then
      redis.call('LPUSH', KEYS[5], ARGV[5])
      break
    end
  end
end
return out
"""

QUEUE_ADMIT: Final = """
-- A job a worker took by blocking (BLMOVE from the level-0 list): count its start
-- against the queue's rate limit, or put it back in front if the limit is reached.
-- KEYS[1] processing list, KEYS[2] rate log (zset), KEYS[3] stalled counts (hash),
-- KEYS[4] counters (hash), KEYS[5] level-0 list
-- ARGV[1] the job, ARGV[2] rate limit ('' for none), ARGV[3] rate window (ms),
-- ARGV[4] rate-log member unique to this call
-- returns {ms to wait (0: admitted; else the job is back at the queue's front),
-- how many times a dead worker had held it}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] ~= '' then
  local window = tonumber(ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
    if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then
      redis.call('RPUSH', KEYS[5], ARGV[1])
    end
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {math.max(tonumber(oldest[2]) + window - now, 1), 0}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], window)
end
redis.call('HINCRBY', KEYS[4], 'started', 1)
local held = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
  held = tonumber(redis.call('HGET', KEYS[3], redis.sha1hex(ARGV[1])) or '0')
end
return {0, held}
"""

QUEUE_ACK: Final = """
-- Settle jobs a worker finished: remove each from its processing list, release its
-- id, forget its stalled count. Each call carries a token unique to the worker's
-- batch, recorded with its result: the same call run again (a retry after its
-- reply was lost) changes nothing and returns what the first run did, so the
-- jobs that run removed are not taken for jobs a reaper put back.
-- KEYS[1] processing list, KEYS[2] job ids (hash), KEYS[3] stalled counts (hash),
-- KEYS[4] counters (hash), KEYS[5] the worker's last ack (string: token, result)
-- ARGV[1] counter to add to ('finished'), ARGV[2] the batch's token, then per job:
-- its id ('' for none) and the job
-- returns how many of the jobs were still in the processing list (the others were
-- put back by a reaper meanwhile and may run again)
local last = redis.call('GET', KEYS[5])
if last then
  local sep = string.find(last, ' ', 1, true)
  if sep and string.sub(last, 1, sep - 1) == ARGV[2] then
    return tonumber(string.sub(last, sep + 1))
  end
end
local stalled = redis.call('EXISTS', KEYS[3]) == 1
local removed = 0
for i = 3, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i + 1]) > 0 then
    removed = removed + 1
    if ARGV[i] ~= '' then
      redis.call('HDEL', KEYS[2], ARGV[i])
    end
    if stalled then
      redis.call('HDEL', KEYS[3], redis.sha1hex(ARGV[i + 1]))
    end
  end
end
if removed > 0 then
  redis.call('HINCRBY', KEYS[4], ARGV[1], removed)
end
-- An hour: a retry comes within the worker's life; the key outlives it by that.
redis.call('SET', KEYS[5], ARGV[2] .. ' ' .. removed, 'PX', 3600000)
return removed
"""

QUEUE_DEAD: Final = """
-- Move a job from a worker's processing list to the queue's dead letters.
-- KEYS[1] processing list, KEYS[2] dead letters (stream), KEYS[3] job ids (hash),
-- KEYS[4] stalled counts (hash), KEYS[5] counters (hash)
-- ARGV[1] the job, ARGV[2] its id ('' for none), ARGV[3] dead-letter MAXLEN
-- (approximate), ARGV[4..] field, value pairs of the dead letter (the job is added)
-- returns the dead letter's entry id, or false if the job was no longer in the
-- processing list (a reaper put it back: it will be retried, not dead-lettered)
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return false
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
fields[#fields + 1] = 'job'
fields[#fields + 1] = ARGV[1]
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('LREM', KEYS[1], -1, ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[2])
end
redis.call('HDEL', KEYS[4], redis.sha1hex(ARGV[1]))
redis.call('HINCRBY', KEYS[5], 'failed', 1)
redis.call('HINCRBY', KEYS[5], 'dead', 1)
return id
"""

QUEUE_HEARTBEAT: Final = """
-- A worker says it is alive until ARGV[2] ms from now; lists workers whose
-- heartbeat lapsed (their jobs are to be put back, see QUEUE_REAP).
-- KEYS[1] workers (zset: worker id -> alive until, ms), KEYS[2] worker info (hash)
-- ARGV[1] worker id, ARGV[2] ttl (ms), ARGV[3] most lapsed workers to list,
-- ARGV[4] the worker's info (its recent rates, JSON)
-- returns {1 if this worker was registered already else 0, lapsed worker ids...}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
local out = {1 - added}
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(lapsed) do
  out[#out + 1] = id
end
return out
"""

QUEUE_GIVE_BACK: Final = """
-- Put one job from a worker's processing list back at the front of the most
-- urgent level (a job the worker never received: its reply was lost).
-- KEYS[1] processing list, KEYS[2] the most urgent level's list
-- ARGV[1] the job, ARGV[2] nudge marker (dropped, not put back)
-- returns 1 if it was there (and is now back), else 0
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
  return 0
end
if ARGV[1] ~= ARGV[2] then
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
return 1
"""

QUEUE_REAP: Final = """
-- Put back the jobs of a worker whose heartbeat lapsed (or, with ARGV[4] = '1', of
-- the calling worker itself as it stops), each at the front of the most urgent
-- level. A job that workers died holding ARGV[2] times is left where it is and
-- returned instead, for the caller to dead-letter (QUEUE_DEAD).
-- KEYS[1] workers (zset), KEYS[2] the worker's processing list, KEYS[3] the most
-- urgent level's list, KEYS[4] stalled counts (hash)
-- ARGV[1] worker id, ARGV[2] most times a job may be held by a worker that died,
-- ARGV[3] most jobs to move in this call, ARGV[4] '1' for the caller's own list,
-- ARGV[5] nudge marker
-- returns {jobs put back, 1 if the list is now empty else 0, the job to
-- dead-letter or ''}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[4] ~= '1' then
  local alive = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if alive and tonumber(alive) > now then
    return {0, 0, ''} -- it came back
  end
end
local back = 0
for _ = 1, tonumber(ARGV[3]) do
  local job = redis.call('LINDEX', KEYS[2], -1)
  if not job then
    break
  end
  if job == ARGV[5] then
    redis.call('RPOP', KEYS[2]) -- a nudge, not a job
  else
    if ARGV[4] ~= '1' then
      -- the stopping worker's own jobs were never run: no stalled count for them
      local sha = redis.sha1hex(job)
      local held = tonumber(redis.call('HGET', KEYS[4], sha) or '0') + 1
      if held >= tonumber(ARGV[2]) then
        return {back, 0, job}
      end
      redis.call('HINCRBY', KEYS[4], sha, 1)
    end
    redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'RIGHT')
    back = back + 1
  end
end
if redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {back, 1, ''}
end
return {back, 0, ''}
"""

QUEUE_RETRY: Final = """
-- Put a failed job back for another attempt: at once on its level, or after a
-- backoff through the level's schedule (released like a delayed event).
-- KEYS[1] processing list, KEYS[2] the level's list, KEYS[3] level-0 list,
-- KEYS[4] the level's schedule (zset), KEYS[5] its data (hash), KEYS[6] index
-- (zset), KEYS[7] stalled counts (hash), KEYS[8] counters (hash)
-- ARGV[1] the job as taken, ARGV[2] the job of its next attempt, ARGV[3] its id
-- (the schedule's member), ARGV[4] backoff (ms), ARGV[5] index member, ARGV[6] wake
-- channel, ARGV[7] nudge marker
-- returns 1, or 0 if the job was no longer in the processing list (a reaper put it
-- back meanwhile: it runs again from there)
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
local backoff = tonumber(ARGV[4])
if backoff <= 0 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  if KEYS[2] ~= KEYS[3] and redis.call('LLEN', KEYS[3]) == 0 then
    redis.call('LPUSH', KEYS[3], ARGV[7])
  end
else
  local t = redis.call('TIME')
  local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + backoff
  local first = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
  redis.call('HSET', KEYS[5], ARGV[3], 'q' .. ARGV[2])
  redis.call('ZADD', KEYS[4], due, ARGV[3])
  local cur = redis.call('ZSCORE', KEYS[6], ARGV[5])
  if not cur or due < tonumber(cur) then
    redis.call('ZADD', KEYS[6], due, ARGV[5])
  end
  if #first == 0 or due < tonumber(first[2]) then
    redis.pcall('PUBLISH', ARGV[6], due) -- a hint to sleeping schedulers
  end
end
redis.call('LREM', KEYS[1], -1, ARGV[1])
redis.call('HDEL', KEYS[7], redis.sha1hex(ARGV[1]))
redis.call('HINCRBY', KEYS[8], 'failed', 1)
return 1
"""

QUEUE_SCHEDULE: Final = """
-- Hold jobs of one priority level until a due time (enqueue(..., delay=) or at=),
-- or enqueue them at once if it is already past. A job whose id is already
-- registered (waiting, scheduled or running) is not scheduled again.
-- KEYS[1] job ids (hash), KEYS[2] the level's schedule (zset), KEYS[3] its data
-- (hash), KEYS[4] index (zset), KEYS[5] the level's list, KEYS[6] level-0 list
-- ARGV[1] 'in' (ARGV[2] ms from now) or 'at' (ARGV[2] epoch ms), ARGV[3] index
-- member, ARGV[4] wake channel, ARGV[5] nudge marker, then per job: its id, '1' if
-- it is deduplicated by id else '0', and the job
-- returns {due ms, then per job 1 (scheduled or enqueued) or 0 (a duplicate)}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due
if ARGV[1] == 'in' then
  due = now + tonumber(ARGV[2])
else
  due = tonumber(ARGV[2])
end
local out = {due}
local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local scheduled, pushed = 0, 0
for i = 6, #ARGV, 3 do
  local id = ARGV[i]
  if ARGV[i + 1] == '1' and redis.call('HSETNX', KEYS[1], id, 1) == 0 then
    out[#out + 1] = 0
  elseif due <= now then
    redis.call('LPUSH', KEYS[5], ARGV[i + 2])
    pushed = pushed + 1
    out[#out + 1] = 1
  else
    redis.call('HSET', KEYS[3], id, 'q' .. ARGV[i + 2])
    redis.call('ZADD', KEYS[2], due, id)
    scheduled = scheduled + 1
    out[#out + 1] = 1
  end
end
if pushed > 0 and KEYS[5] ~= KEYS[6] and redis.call('LLEN', KEYS[6]) == 0 then
  redis.call('LPUSH', KEYS[6], ARGV[5])
end
if scheduled > 0 then
  local cur = redis.call('ZSCORE', KEYS[4], ARGV[3])
  if not cur or due < tonumber(cur) then
    redis.call('ZADD', KEYS[4], due, ARGV[3])
  end
  if #first == 0 or due < tonumber(first[2]) then
    redis.pcall('PUBLISH', ARGV[4], due) -- a hint to sleeping schedulers
  end
end
return out
"""

QUEUE_REQUEUE_DEAD: Final = """
-- Put dead letters back on their queue, each at the back of its level (and its id
-- registered again), and remove them from the dead letters, one by one.
-- KEYS[1] dead letters (stream), KEYS[2] job ids (hash), KEYS[3] the level-0 list,
-- KEYS[4..] the lists of levels 1 and up
-- ARGV[1] nudge marker, then per entry: its entry id, its level, its job id ('' for
-- none) and the job to enqueue
-- returns how many were put back (an entry no longer there is skipped)
local done = 0
local urgent = false
for i = 2, #ARGV, 4 do
  local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #found > 0 then
    local level = tonumber(ARGV[i + 1])
    local list = KEYS[3 + level]
    redis.call('LPUSH', list, ARGV[i + 3])
    if ARGV[i + 2] ~= '' then
      redis.call('HSET', KEYS[2], ARGV[i + 2], 1)
    end
    redis.call('XDEL', KEYS[1], ARGV[i])
    done = done + 1
    if level > 0 then
      urgent = true
    end
  end
end
if urgent and redis.call('LLEN', KEYS[3]) == 0 then
  redis.call('LPUSH', KEYS[3], ARGV[1])
end
return done
"""
