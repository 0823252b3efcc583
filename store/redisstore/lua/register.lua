-- Register: ARGV node, lease ms, active, waiting, reap limit,
--   limits: has (0|1), max, maxw, wait_ms, order,
--   n held, then n pairs (key value, count),
--   then triples (ticket id, priority, key value) to the end.
-- Reply: state(), with the node's new epoch.
local node, lease = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local c = cfg()
if ARGV[6] == '1' and not c.max then
	redis.call('HSET', K_CFG, 'max', ARGV[7], 'maxw', ARGV[8], 'wait_ms', ARGV[9],
		'order', ARGV[10], 'set_at', now)
	c = cfg()
end
reap_expired(now, tonumber(ARGV[5]), c)
local touched = {}
-- held slots: the node's word replaces the store's
local hh = k_held(node)
local old = redis.call('HGETALL', hh)
local delta = {}
for i = 1, #old, 2 do
	delta[old[i]] = -(lint(old[i + 1]) or 0)
end
redis.call('DEL', hh)
local nheld = tonumber(ARGV[11])
local i = 12
for _ = 1, nheld do
	local key, n = ARGV[i], tonumber(ARGV[i + 1])
	i = i + 2
	if n > 0 then
		redis.call('HINCRBY', hh, key, n)
		delta[key] = (delta[key] or 0) + n
	end
end
for key, d in pairs(delta) do
	if d ~= 0 then
		add(K_ACTIVE, key, d)
		add(K_TOT, 'a', d)
		touched[key] = true
	end
end
-- tickets: the old ones leave, the node's waiters queue anew at the end;
-- undelivered grants go (their tickets are among the waiters)
drop_tickets(node)
redis.call('DEL', k_grants(node))
local tk = k_tickets(node)
while i + 2 <= #ARGV do
	local id, prio, key = ARGV[i], ARGV[i + 1], ARGV[i + 2]
	i = i + 3
	if redis.call('HSETNX', tk, id, prio .. '\n' .. key) == 1 then
		local seq = redis.call('INCR', K_SEQ)
		redis.call('ZADD', k_q(prio, key), seq, id .. '\n' .. node)
		redis.call('ZADD', k_prios(key), prio, prio)
		add(K_WAITING, key, 1)
		add(K_TOT, 'w', 1)
		redis.call('SADD', K_WKEYS, key)
		touched[key] = true
	end
end
redis.call('HSET', K_EPOCHS, node, redis.call('INCR', K_SEQ))
redis.call('ZADD', K_NODES, now + lease, node)
redis.call('HSET', K_INFO, node, ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. now)
for key in pairs(touched) do grant(key, c) end
return state(now, false, node, c)
