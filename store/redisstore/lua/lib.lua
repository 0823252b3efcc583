-- connlimit fleet zone: the functions every operation shares. The store
-- loads this file and every operation's file as one Redis Functions
-- library (FUNCTION LOAD, once), each operation a function run by FCALL.
--
-- KEYS[1] is the zone's base key "<prefix>:{<zone>}". Every key a script
-- touches is KEYS[1] .. ":" .. suffix, so it carries the base key's Cluster
-- hash tag {<zone>}: one zone is one slot, and the keys a script derives
-- (per node, per key value) are in the slot of the key it was given.
--
--   cfg            hash   max, maxw, wait_ms, order, paused, set_at (ms),
--                         learn (ms: until then the store learns, grants nothing)
--   gen            string the generation of this state: made anew when the
--                         store finds itself empty
--   seq            string sequence: ticket places and node epochs
--   nodes          zset   node id -> lease expiry (ms, Redis' clock)
--   info           hash   node id -> "active waiting renewed_ms" (as reported)
--   epochs         hash   node id -> epoch of its latest registration
--   tot            hash   a -> fleet active, w -> fleet waiting
--   active         hash   key value -> slots held fleet-wide
--   waiting        hash   key value -> waiters fleet-wide
--   wkeys          set    key values that have waiters
--   held:<node>    hash   key value -> slots held by that node
--   tickets:<node> hash   ticket id -> "<priority>\n<key value>"
--   reg:<node>     set    ticket ids a registration in chunks named so far
--   grants:<node>  list   "<epoch>\n<ticket id>\n<priority>\n<key value>",
--                         newest first (LPUSH); the node moves each to
--   inflight:<node> list  where it stays until the node acknowledges it
--   prios:<key>    zset   that key value's priorities that have waiters
--   q:<prio>:<key> zset   "<ticket id>\n<node id>" -> place (seq)
--
-- With a fair share (cfg fair = 1), key values name tenants: the zone's
-- max and maxw count tot, and a freed slot goes to the eligible tenant
-- (below cfg fmax) with the fewest slots for its weight:
--   weights        hash   tenant -> weight (others weigh 1)
--   fr:<prio>      zset   eligible tenants waiting at prio: "<head>\n<tenant>"
--                         -> active ÷ weight; <head> (16 digits) orders ties
--                         by the tenant's next waiter in the zone's order
--   fready         zset   the priorities whose fr is not empty
--   fp:<tenant>    hash   prio -> the tenant's member in fr:<prio>
local B, K_CFG, K_SEQ, K_NODES, K_INFO, K_EPOCHS, K_TOT, K_ACTIVE, K_WAITING, K_WKEYS, K_GEN

-- sets the zone every function of this call works on: KEYS[1]. The names
-- are made again only when the zone is not the last call's.
local function zone(b)
	if b == B then return end
	B = b
	K_CFG, K_SEQ, K_NODES = b .. ':cfg', b .. ':seq', b .. ':nodes'
	K_INFO, K_EPOCHS, K_TOT = b .. ':info', b .. ':epochs', b .. ':tot'
	K_ACTIVE, K_WAITING, K_WKEYS = b .. ':active', b .. ':waiting', b .. ':wkeys'
	K_GEN = b .. ':gen'
end
local function k_held(node) return B .. ':held:' .. node end
local function k_tickets(node) return B .. ':tickets:' .. node end
local function k_grants(node) return B .. ':grants:' .. node end
local function k_inflight(node) return B .. ':inflight:' .. node end
local function k_reg(node) return B .. ':reg:' .. node end
local function k_prios(key) return B .. ':prios:' .. key end
local function k_q(prio, key) return B .. ':q:' .. prio .. ':' .. key end
local function k_fr(prio) return B .. ':fr:' .. prio end
local function k_fp(tenant) return B .. ':fp:' .. tenant end
local function k_weights() return B .. ':weights' end
local function k_fready() return B .. ':fready' end

-- DIRTY: the tenants whose place among the eligible may have changed in
-- this call (their active count or their lines); FORCE: grant even if
-- none did. settle() puts them right and grants, after every operation.
local DIRTY, FORCE = {}, false
local function mark(key) DIRTY[key] = true end

-- now in ms, by Redis' clock
local function now_ms()
	local t = redis.call('TIME')
	return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fail(msg)
	error({err = 'ERR connlimit: ' .. msg})
end

local function quote(v)
	return string.format('%q', string.sub(tostring(v), 1, 60))
end

-- an integer read from Redis (false: absent, 0); errors if garbled
local function int(v, where)
	if not v then return 0 end
	local n = tonumber(v)
	if not n or n % 1 ~= 0 then
		fail('garbled value in ' .. where .. ': ' .. quote(v))
	end
	return n
end

-- an integer read from Redis, or nil if garbled (false: absent, 0)
local function lint(v)
	if not v then return 0 end
	if string.match(v, '^%-?%d+$') then return tonumber(v) end
	return nil
end

-- adds d to field f of hash h; a garbled value counts as 0 (this is how
-- the repairing paths reset it); a result <= 0 deletes the field.
local function add(h, f, d)
	local n = redis.pcall('HINCRBY', h, f, d)
	if type(n) ~= 'number' then
		-- not an integer (or h not a hash: HSET says so)
		n = d
		if n > 0 then redis.call('HSET', h, f, n) end
	end
	if n <= 0 then redis.call('HDEL', h, f) end
	return n
end

-- the zone's settings; c.max is nil if none were set. c.wait and c.set_at
-- only if full (state() reports them; taking and giving need neither).
local function cfg(full)
	local v
	if full then
		v = redis.call('HMGET', K_CFG, 'max', 'maxw', 'learn', 'order', 'paused', 'fair', 'fmax', 'wait_ms', 'set_at')
	else
		v = redis.call('HMGET', K_CFG, 'max', 'maxw', 'learn', 'order', 'paused', 'fair', 'fmax')
	end
	local c = {paused = false, maxw = 0, wait = 0, order = 'fifo', set_at = 0, learning = false, learn = 0,
		fair = v[6] == '1', fmax = lint(v[7]) or 0}
	if v[3] then
		c.learn = int(v[3], 'cfg.learn')
		c.learning = true
	end
	if v[5] then
		if v[5] ~= '0' and v[5] ~= '1' then fail('garbled value in cfg.paused: ' .. quote(v[5])) end
		c.paused = v[5] == '1'
	end
	if not v[1] then return c end
	c.max = int(v[1], 'cfg.max')
	if c.max < 1 then fail('garbled value in cfg.max: ' .. quote(v[1])) end
	c.maxw = int(v[2], 'cfg.maxw')
	if full then
		c.wait = int(v[8], 'cfg.wait_ms')
		c.set_at = int(v[9], 'cfg.set_at')
	end
	if v[4] then
		if v[4] ~= 'fifo' and v[4] ~= 'lifo' then fail('garbled value in cfg.order: ' .. quote(v[4])) end
		c.order = v[4]
	end
	return c
end

-- takes the next waiter of key out of its list: ticket id, node, priority;
-- nil if none. A garbled member is dropped (and counted out of waiting).
local function popnext(key, order)
	local pk = k_prios(key)
	for _ = 1, 64 do
		local top = redis.call('ZREVRANGE', pk, 0, 0)[1]
		if not top then return nil end
		local q = k_q(top, key)
		local r
		if order == 'lifo' then r = redis.call('ZPOPMAX', q) else r = redis.call('ZPOPMIN', q) end
		if redis.call('EXISTS', q) == 0 then redis.call('ZREM', pk, top) end
		local m = r[1]
		if m then
			local id, node = string.match(m, '^(%d+)\n(.*)$')
			if id then return id, node, top end
			add(K_WAITING, key, -1)
			add(K_TOT, 'w', -1)
		end
	end
	return nil
end

-- grants free slots of key to its next waiters: each one's node now
-- holds the slot, and finds the grant in its grants list. freed (if any)
-- slots of key are given back first: where there is room they go
-- straight to waiters, and the key's count and the fleet's change only by
-- what is left over. Returns how many were granted.
local function grant(key, c, freed)
	freed = freed or 0
	if c.fair then
		-- settle() grants, to the tenant whose turn it is
		if freed > 0 then
			add(K_ACTIVE, key, -freed)
			add(K_TOT, 'a', -freed)
		end
		mark(key)
		return 0
	end
	local stopped = c.paused or c.learning or not c.max
	if stopped and freed == 0 then return 0 end
	local a0 = int(redis.call('HGET', K_ACTIVE, key), 'active')
	local a = a0 - freed
	local n, empty = 0, false
	while not stopped and a < c.max do
		local id, node, prio = popnext(key, c.order)
		if not id then
			empty = true
			break
		end
		a, n = a + 1, n + 1
		redis.call('HINCRBY', k_held(node), key, '1')
		redis.call('HDEL', k_tickets(node), id)
		local ep = redis.call('HGET', K_EPOCHS, node) or '0'
		redis.call('LPUSH', k_grants(node), ep .. '\n' .. id .. '\n' .. prio .. '\n' .. key)
	end
	if a ~= a0 then
		if a <= 0 then redis.call('HDEL', K_ACTIVE, key) else redis.call('HSET', K_ACTIVE, key, a) end
		add(K_TOT, 'a', a - a0)
	end
	if n > 0 then
		add(K_TOT, 'w', -n)
		if add(K_WAITING, key, -n) <= 0 then redis.call('SREM', K_WKEYS, key) end
	end
	if empty then
		-- nobody left in line: the key's waiting count must be 0 too
		local w = redis.call('HGET', K_WAITING, key)
		if w then
			redis.call('HDEL', K_WAITING, key)
			add(K_TOT, 'w', -(lint(w) or 0))
		end
		redis.call('SREM', K_WKEYS, key)
	end
	return n
end

local function grant_all(c)
	if c.fair then
		FORCE = true
		return 0
	end
	if c.paused or c.learning or not c.max then return 0 end
	local n = 0
	for _, key in ipairs(redis.call('SMEMBERS', K_WKEYS)) do
		n = n + grant(key, c)
	end
	return n
end

-- takes one ticket of node out of its waiting list; true if it was there
local function unqueue(node, id, prio, key)
	local q = k_q(prio, key)
	if redis.call('ZREM', q, id .. '\n' .. node) == 0 then return false end
	if redis.call('EXISTS', q) == 0 then redis.call('ZREM', k_prios(key), prio) end
	if add(K_WAITING, key, -1) <= 0 then redis.call('SREM', K_WKEYS, key) end
	add(K_TOT, 'w', -1)
	mark(key)
	return true
end

-- takes one ticket of node out of its tickets and its waiting list;
-- returns its key value if it was queued
local function drop_ticket(node, id)
	local tk = k_tickets(node)
	local v = redis.call('HGET', tk, id)
	if not v then return nil end
	redis.call('HDEL', tk, id)
	local prio, key = string.match(v, '^(%-?%d+)\n(.*)$')
	if prio and unqueue(node, id, prio, key) then return key end
	return nil
end

-- runs cmd on key with args appended, in calls of at most 1000 of them
-- (unpack has a limit); returns the sum of the integer replies
local function call_many(cmd, key, args)
	local n = 0
	for j = 1, #args, 1000 do
		n = n + redis.call(cmd, key, unpack(args, j, math.min(j + 999, #args)))
	end
	return n
end

-- takes tickets ids of node out of its tickets and the waiting lists,
-- with one command per line rather than several per ticket
local function drop_ticket_ids(node, ids)
	if #ids == 0 then return end
	local tk = k_tickets(node)
	local vs = {}
	for j = 1, #ids, 1000 do
		local part = redis.call('HMGET', tk, unpack(ids, j, math.min(j + 999, #ids)))
		for _, v in ipairs(part) do vs[#vs + 1] = v end
	end
	call_many('HDEL', tk, ids)
	local lines = {}
	for j, v in ipairs(vs) do
		local prio, key = string.match(v or '', '^(%-?%d+)\n(.*)$')
		if prio then
			local l = lines[v]
			if not l then
				l = {prio = prio, key = key, m = {}}
				lines[v] = l
			end
			l.m[#l.m + 1] = ids[j] .. '\n' .. node
		end
	end
	local gone = 0
	for _, l in pairs(lines) do
		local q = k_q(l.prio, l.key)
		local n = call_many('ZREM', q, l.m)
		if redis.call('EXISTS', q) == 0 then redis.call('ZREM', k_prios(l.key), l.prio) end
		if n > 0 and add(K_WAITING, l.key, -n) <= 0 then redis.call('SREM', K_WKEYS, l.key) end
		mark(l.key)
		gone = gone + n
	end
	if gone > 0 then add(K_TOT, 'w', -gone) end
end

-- names tickets of node for its registration: triples (ticket id,
-- priority, key value) in args from index i on, oldest first. A ticket
-- the store has queued as given keeps its place; the others join the end
-- of the line, in the order given. Notes the key values whose lines
-- changed in touched; returns the ids named, as a set, and how many of
-- them the store had.
local function name_tickets(node, args, i, touched)
	local tk = k_tickets(node)
	local named, new, found = {}, {}, 0
	while i + 2 <= #args do
		local id, prio, key = args[i], args[i + 1], args[i + 2]
		i = i + 3
		if not named[id] then
			named[id] = true
			local v = prio .. '\n' .. key
			local had = redis.call('HGET', tk, id)
			if had then found = found + 1 end
			if had ~= v or not redis.call('ZSCORE', k_q(prio, key), id .. '\n' .. node) then
				local old = had and drop_ticket(node, id)
				if old then touched[old] = true end
				new[#new + 1] = {id, prio, key, v}
			end
		end
	end
	if #new == 0 then return named, found end
	-- one INCRBY, one HSET, and one ZADD and count update per line, not
	-- one each per ticket
	local seq = redis.call('INCRBY', K_SEQ, #new) - #new
	local fields, lines, per = {}, {}, {}
	for _, t in ipairs(new) do
		local id, prio, key, v = t[1], t[2], t[3], t[4]
		seq = seq + 1
		fields[#fields + 1], fields[#fields + 2] = id, v
		local l = lines[v]
		if not l then
			l = {prio = prio, key = key, m = {}}
			lines[v] = l
		end
		l.m[#l.m + 1], l.m[#l.m + 2] = seq, id .. '\n' .. node
		per[key] = (per[key] or 0) + 1
	end
	call_many('HSET', tk, fields)
	for _, l in pairs(lines) do
		call_many('ZADD', k_q(l.prio, l.key), l.m)
		redis.call('ZADD', k_prios(l.key), l.prio, l.prio)
	end
	for key, n in pairs(per) do
		add(K_WAITING, key, n)
		redis.call('SADD', K_WKEYS, key)
		touched[key] = true
		mark(key)
	end
	add(K_TOT, 'w', #new)
	return named, found
end

-- adds the ids of the set named to the set at key rs, in one SADD
local function add_named(rs, named)
	local ids = {}
	for id in pairs(named) do ids[#ids + 1] = id end
	call_many('SADD', rs, ids)
end

-- drops node's held slots from the fleet's counts; returns their keys
local function drop_held(node)
	local hh = k_held(node)
	local held = redis.call('HGETALL', hh)
	local keys = {}
	for i = 1, #held, 2 do
		local n = lint(held[i + 1]) or 0
		if n > 0 then
			add(K_ACTIVE, held[i], -n)
			add(K_TOT, 'a', -n)
		end
		mark(held[i])
		keys[#keys + 1] = held[i]
	end
	redis.call('DEL', hh)
	return keys
end

-- removes a node whose lease ran out, with everything it held or queued;
-- returns the keys whose slots it held
local function reap(node)
	local keys = drop_held(node)
	drop_ticket_ids(node, redis.call('HKEYS', k_tickets(node)))
	redis.call('DEL', k_tickets(node), k_grants(node), k_inflight(node), k_reg(node))
	redis.call('ZREM', K_NODES, node)
	redis.call('HDEL', K_INFO, node)
	redis.call('HDEL', K_EPOCHS, node)
	return keys
end

-- reaps at most limit expired nodes, then grants what they held. Costs
-- O(log nodes) when none expired.
local function reap_expired(now, limit, c)
	local dead = redis.call('ZRANGEBYSCORE', K_NODES, '-inf', now, 'LIMIT', 0, limit)
	if #dead == 0 then return 0 end
	local keys = {}
	for _, node in ipairs(dead) do
		for _, key in ipairs(reap(node)) do keys[key] = true end
	end
	for key in pairs(keys) do grant(key, c) end
	return #dead
end

-- went_back says whether the store went back in time (restored from an
-- older snapshot, a failover to a replica that lagged): the caller saw a
-- higher sequence than the store has now (seen, a number or its string,
-- 0 if none). The store then learns for a lease (ms), as after losing its
-- data, and its sequence goes on from what was seen, so that it says so
-- once. c is the zone's settings, which it updates, or nil.
local function went_back(seen, lease, c)
	seen = tonumber(seen)
	if not seen or seen <= 0 or seen <= (tonumber(redis.call('GET', K_SEQ)) or 0) then return false end
	redis.call('SET', K_SEQ, seen)
	c = c or cfg()
	if not c.learning then
		c.learn, c.learning = now_ms() + tonumber(lease), true
		redis.call('HSET', K_CFG, 'learn', c.learn)
	end
	return true
end

-- ends the learning period once its time has come, and grants what is free
local function learnt(now, c)
	if c.learning and c.learn <= now then
		redis.call('HDEL', K_CFG, 'learn')
		c.learning = false
		grant_all(c)
	end
end

-- the reply that Renew, Register and Status share
local function state(now, lapsed, node, c, repair)
	local t = redis.call('HMGET', K_TOT, 'a', 'w')
	local ep = 0
	if not lapsed then ep = lint(redis.call('HGET', K_EPOCHS, node)) or 0 end
	local max = 0
	if c.max then max = c.max end
	return {lapsed and 1 or 0, max, c.maxw, c.wait, c.order, c.set_at, c.paused and 1 or 0,
		math.max(lint(t[1]) or 0, 0), math.max(lint(t[2]) or 0, 0),
		redis.call('ZCARD', K_NODES), ep, now, redis.call('GET', K_GEN) or '',
		c.learning and 1 or 0, repair and 1 or 0, lint(redis.call('GET', K_SEQ)) or 0}
end

-- fair share ---------------------------------------------------------------

-- refresh puts tenant t's entries among the eligible right: one per
-- priority it waits at, while it is below fair_max; an entry that stays
-- only has its score set. O(priorities × log tenants).
local function refresh(t, c)
	local fp = k_fp(t)
	local old = {}
	local kv = redis.call('HGETALL', fp)
	for j = 1, #kv, 2 do old[kv[j]] = kv[j + 1] end
	local new = {}
	local a = lint(redis.call('HGET', K_ACTIVE, t)) or 0
	if c.fmax == 0 or a < c.fmax then
		for _, p in ipairs(redis.call('ZRANGE', k_prios(t), 0, -1)) do
			local head
			if c.order == 'lifo' then
				head = redis.call('ZRANGE', k_q(p, t), -1, -1, 'WITHSCORES')[2]
			else
				head = redis.call('ZRANGE', k_q(p, t), 0, 0, 'WITHSCORES')[2]
			end
			if head then
				local seq = tonumber(head)
				if c.order == 'lifo' then seq = 9007199254740991 - seq end -- the newest first
				new[p] = string.format('%016.0f', seq) .. '\n' .. t
			end
		end
	end
	for p, m in pairs(old) do
		if new[p] ~= m then
			local fr = k_fr(p)
			redis.call('ZREM', fr, m)
			if not new[p] then
				redis.call('HDEL', fp, p)
				if redis.call('EXISTS', fr) == 0 then redis.call('ZREM', k_fready(), p) end
			end
		end
	end
	if next(new) == nil then return end
	local w = lint(redis.call('HGET', k_weights(), t)) or 1
	if w < 1 then w = 1 end
	for p, m in pairs(new) do
		redis.call('ZADD', k_fr(p), a / w, m)
		if old[p] ~= m then
			redis.call('HSET', fp, p, m)
			if not old[p] then redis.call('ZADD', k_fready(), p, p) end
		end
	end
end

-- grant_fair hands free slots to the eligible tenants in turn: the
-- highest priority first, then the smallest active ÷ weight, then the
-- tenant whose next waiter comes first in the zone's order.
local function grant_fair(c)
	if c.paused or c.learning or not c.max then return 0 end
	local ta = lint(redis.call('HGET', K_TOT, 'a')) or 0
	local n = 0
	while ta < c.max do
		local p = redis.call('ZREVRANGE', k_fready(), 0, 0)[1]
		if not p then break end
		local m = redis.call('ZRANGE', k_fr(p), 0, 0)[1]
		if not m then
			redis.call('ZREM', k_fready(), p)
		else
			redis.call('ZREM', k_fr(p), m) -- refresh puts it back if it still waits
			local t = string.match(m, '^%d+\n(.*)$') or ''
			local q = k_q(p, t)
			local r
			if c.order == 'lifo' then r = redis.call('ZPOPMAX', q) else r = redis.call('ZPOPMIN', q) end
			if redis.call('EXISTS', q) == 0 then redis.call('ZREM', k_prios(t), p) end
			local id, node
			if r[1] then id, node = string.match(r[1], '^(%d+)\n(.*)$') end
			if r[1] then
				if add(K_WAITING, t, -1) <= 0 then redis.call('SREM', K_WKEYS, t) end
				add(K_TOT, 'w', -1)
			end
			if id then
				ta, n = ta + 1, n + 1
				redis.call('HINCRBY', k_held(node), t, '1')
				redis.call('HINCRBY', K_ACTIVE, t, '1')
				redis.call('HINCRBY', K_TOT, 'a', '1')
				redis.call('HDEL', k_tickets(node), id)
				local ep = redis.call('HGET', K_EPOCHS, node) or '0'
				redis.call('LPUSH', k_grants(node), ep .. '\n' .. id .. '\n' .. p .. '\n' .. t)
			end
			refresh(t, c)
		end
	end
	return n
end

-- settle runs after every operation: with a fair share, the tenants it
-- changed take their places among the eligible again, and free slots are
-- granted.
local function settle()
	if next(DIRTY) == nil and not FORCE then return end
	local dirty = DIRTY
	DIRTY, FORCE = {}, false
	if redis.call('HGET', K_CFG, 'fair') ~= '1' then return end
	local c = cfg()
	for t in pairs(dirty) do refresh(t, c) end
	grant_fair(c)
end

-- set_fair puts a config's fair share in force (js: JSON, {"on":1,
-- "max":n,"weights":{...}}; '' or on 0: off), every waiting tenant's
-- place anew.
local function set_fair(js)
	local f = {}
	if js ~= '' then f = cjson.decode(js) end
	local wk = k_weights()
	redis.call('DEL', wk)
	if f.on == 1 then
		redis.call('HSET', K_CFG, 'fair', '1', 'fmax', tostring(f.max or 0))
		local ws = {}
		for t, w in pairs(f.weights or {}) do
			ws[#ws + 1] = t
			ws[#ws + 1] = tostring(w)
		end
		if #ws > 0 then call_many('HSET', wk, ws) end
	else
		redis.call('HDEL', K_CFG, 'fair', 'fmax')
	end
	for _, t in ipairs(redis.call('SMEMBERS', K_WKEYS)) do mark(t) end
	FORCE = true
end
