-- Renew: ARGV node, lease ms, active, waiting, reap limit,
--   "<epoch> <check 0|1> <held total> <tickets> <seq seen>" (one argument: an
--   unauthenticated client may send no more than 10, and must be told
--   NOAUTH), then the grants the node took in (acks).
-- Reply: state(): lapsed if the node was not registered or its lease had
-- run out (it is then reaped here, and not renewed); repair if check and
-- the store's count of the node's held slots or tickets is not the node's
-- (compared only while no grant of the node is on its way).
local node, lease = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local c = cfg(true)
local epoch, check, held_n, tickets_n, seen = string.match(ARGV[6], '^(%d+) ([01]) (%-?%d+) (%-?%d+) (%d+)$')
if not epoch then fail('garbled renewal ' .. quote(ARGV[6])) end
-- a store that went back in time grants nothing before it has learnt
if went_back(seen, lease, c) then return state(now, true, node, c, false) end
local fl = k_inflight(node)
local k = #ARGV - 6
if k > 0 then
	-- acks come oldest first, and are most often the oldest k in flight
	-- (its tail): then one LTRIM takes them all out
	local tail = redis.call('LRANGE', fl, -k, -1)
	local inorder = #tail == k
	for j = 1, k do
		if not inorder then break end
		inorder = tail[k + 1 - j] == ARGV[6 + j]
	end
	if inorder then
		redis.call('LTRIM', fl, 0, -k - 1)
	else
		for j = 7, #ARGV do redis.call('LREM', fl, -1, ARGV[j]) end
	end
end
learnt(now, c)
reap_expired(now, tonumber(ARGV[5]), c)
local exp = redis.call('ZSCORE', K_NODES, node)
if exp and tonumber(exp) <= now then
	-- expired, but beyond this renewal's reap limit
	for _, key in ipairs(reap(node)) do grant(key, c) end
	exp = nil
end
if not exp then return state(now, true, node, c, false) end
redis.call('ZADD', K_NODES, 'XX', now + lease, node)
redis.call('HSET', K_INFO, node, ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. now)
local repair = false
if check == '1' and redis.call('LLEN', fl) == 0 and redis.call('LLEN', k_grants(node)) == 0 then
	local held = 0
	for _, v in ipairs(redis.call('HVALS', k_held(node))) do held = held + (lint(v) or -1) end
	repair = held ~= tonumber(held_n) or redis.call('HLEN', k_tickets(node)) ~= tonumber(tickets_n)
end
return state(now, false, node, c, repair)
