-- Take: ARGV node, ticket id, priority, key value, seq seen, lease ms.
-- Reply: 'admitted' | 'queued' | {'rejected', reason} | 'lapsed' | 'nolimits'
-- Everything is read (and checked) before anything is written. With a
-- fair share, the key value is the connection's tenant.
local node, id, prio, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local exp = redis.call('ZSCORE', K_NODES, node)
if not exp or tonumber(exp) <= now_ms() then return 'lapsed' end
local c = cfg()
if went_back(ARGV[5], ARGV[6], c) then return 'lapsed' end
if not c.max then return 'nolimits' end
local a = int(redis.call('HGET', K_ACTIVE, key), 'active')
local w = int(redis.call('HGET', K_WAITING, key), 'waiting')
local room = a < c.max and w <= 0
if c.fair then
	-- key is the tenant: the zone counts as a whole; an arrival goes in
	-- while a slot is free, its tenant is below fair_max and no eligible
	-- tenant waits
	local t = redis.call('HMGET', K_TOT, 'a', 'w')
	room = (lint(t[1]) or 0) < c.max and (c.fmax == 0 or a < c.fmax) and redis.call('EXISTS', k_fready()) == 0
	w = lint(t[2]) or 0
	mark(key)
end
if not c.paused and not c.learning and room then
	redis.call('HINCRBY', k_held(node), key, '1')
	redis.call('HINCRBY', K_ACTIVE, key, '1')
	redis.call('HINCRBY', K_TOT, 'a', '1')
	return 'admitted'
end
if c.maxw < 0 then return {'rejected', 'no_waiting'} end
if c.maxw > 0 and w >= c.maxw then return {'rejected', 'queue_full'} end
local kw = w
if c.fair then kw = int(redis.call('HGET', K_WAITING, key), 'waiting') end
local tk = k_tickets(node)
if redis.call('HSETNX', tk, id, prio .. '\n' .. key) == 0 then
	fail('ticket ' .. id .. ' of node ' .. quote(node) .. ' is already queued')
end
local seq = redis.call('INCR', K_SEQ)
redis.call('ZADD', k_q(prio, key), seq, id .. '\n' .. node)
redis.call('ZADD', k_prios(key), prio, prio)
redis.call('HINCRBY', K_WAITING, key, '1')
redis.call('HINCRBY', K_TOT, 'w', '1')
-- a key with waiters is in wkeys already
if kw <= 0 then redis.call('SADD', K_WKEYS, key) end
return 'queued'
