-- Register: ARGV node, lease ms, active, waiting, reap limit,
--   limits: has (0|1), max, maxw, wait_ms, order,
--   "<config max> <maxw> <wait_ms> <order> <paused 0|1>",
--   the generation the node knew ('' if none),
--   the config's fair share (JSON, see set_fair; '' off),
--   n held, then n pairs (key value, count),
--   more (1 if RegisterTickets calls follow),
--   then triples (ticket id, priority, key value) to the end, oldest first.
-- Reply: state(), with the node's new epoch, then how many tickets the
-- store had for the node that this call did not name: if the
-- RegisterTickets calls that follow do not name them all, RegisterSweep
-- must take out the rest.
local node, lease = ARGV[1], tonumber(ARGV[2])
local SWEEP_INLINE = 512
local now = now_ms()
local gen = redis.call('GET', K_GEN)
if not gen then
	gen = now .. '-' .. node
	redis.call('SET', K_GEN, gen)
end
local known = ARGV[12]
if known ~= '' and known ~= gen then
	-- The store lost the state this node knew (restarted empty, flushed):
	-- it grants nothing until a lease after it found itself empty, by
	-- when every live node has registered what it holds.
	local born = tonumber(string.match(gen, '^(%d+)%-')) or now
	if born + lease > now then
		local cur = lint(redis.call('HGET', K_CFG, 'learn')) or 0
		if born + lease > cur then redis.call('HSET', K_CFG, 'learn', born + lease) end
	end
end
local c = cfg(true)
if ARGV[6] == '1' and not c.max then
	-- a new fleet, or a store that lost its data: the node's word, its
	-- config's limits and the operator's override and pause over them
	local cmax, cmaxw, cwait, corder, paused = string.match(ARGV[11], '^(%d+) (%-?%d+) (%d+) (%a+) ([01])$')
	if not cmax then fail('garbled registration ' .. quote(ARGV[11])) end
	redis.call('HSET', K_CFG, 'max', ARGV[7], 'maxw', ARGV[8], 'wait_ms', ARGV[9],
		'order', ARGV[10], 'set_at', now, 'cmax', cmax, 'cmaxw', cmaxw, 'cwait_ms', cwait, 'corder', corder)
	if paused == '1' then redis.call('HSET', K_CFG, 'paused', '1') end
	redis.call('HSET', K_CFG, 'cfair', ARGV[13])
	set_fair(ARGV[13])
	c = cfg(true)
end
learnt(now, c)
reap_expired(now, tonumber(ARGV[5]), c)
local touched = {}
-- held slots: the node's word replaces the store's
local hh = k_held(node)
local keys = {}
for _, key in ipairs(redis.call('HKEYS', hh)) do keys[key] = true end
redis.call('DEL', hh)
local nheld = tonumber(ARGV[14])
local i = 15
for _ = 1, nheld do
	local key, n = ARGV[i], tonumber(ARGV[i + 1])
	i = i + 2
	if n > 0 then
		redis.call('HINCRBY', hh, key, n)
		keys[key] = true
	end
end
-- The fleet's count of each key the node holds or held is counted again
-- from every node's own: a count that a lost write or a garbled value
-- left wrong heals here.
local nodes = redis.call('ZRANGE', K_NODES, 0, -1)
if not redis.call('ZSCORE', K_NODES, node) then nodes[#nodes + 1] = node end
for key in pairs(keys) do
	local a = 0
	for _, n in ipairs(nodes) do a = a + (lint(redis.call('HGET', k_held(n), key)) or 0) end
	if a > 0 then redis.call('HSET', K_ACTIVE, key, a) else redis.call('HDEL', K_ACTIVE, key) end
	touched[key] = true
end
local total = 0
for _, v in ipairs(redis.call('HVALS', K_ACTIVE)) do total = total + (lint(v) or 0) end
redis.call('HSET', K_TOT, 'a', total)
-- tickets: those the store still has keep their places; the others
-- join the end in the node's order; tickets the node no longer names
-- leave. A registration with more tickets than one call should take
-- names the rest in RegisterTickets calls and ends with RegisterSweep,
-- which takes out the ones it did not name.
local more = ARGV[i] == '1'
local tk, rs = k_tickets(node), k_reg(node)
local had = redis.call('HLEN', tk)
local named, found = name_tickets(node, ARGV, i + 1, touched)
redis.call('UNLINK', rs)
local stale = 0
if not more and redis.call('HLEN', tk) <= SWEEP_INLINE then
	local gone = {}
	for _, id in ipairs(redis.call('HKEYS', tk)) do
		if not named[id] then gone[#gone + 1] = id end
	end
	drop_ticket_ids(node, gone)
else
	add_named(rs, named)
	stale = had - found
	if not more and stale <= 0 then redis.call('UNLINK', rs) end
end
-- Undelivered grants go: the node re-queued their tickets.
redis.call('DEL', k_grants(node), k_inflight(node))
redis.call('HSET', K_EPOCHS, node, redis.call('INCR', K_SEQ))
redis.call('ZADD', K_NODES, now + lease, node)
redis.call('HSET', K_INFO, node, ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. now)
for key in pairs(touched) do grant(key, c) end
local r = state(now, false, node, c, false)
r[#r + 1] = stale
return r
