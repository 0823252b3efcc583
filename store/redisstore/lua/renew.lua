-- Renew: ARGV node, lease ms, active, waiting, reap limit.
-- Reply: state(): lapsed if the node was not registered or its lease had
-- run out (it is then reaped here, and not renewed).
local node, lease = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local c = cfg()
reap_expired(now, tonumber(ARGV[5]), c)
local exp = redis.call('ZSCORE', K_NODES, node)
if exp and tonumber(exp) <= now then
	-- expired, but beyond this renewal's reap limit
	for _, key in ipairs(reap(node)) do grant(key, c) end
	exp = nil
end
if not exp then return state(now, true, node, c) end
redis.call('ZADD', K_NODES, 'XX', now + lease, node)
redis.call('HSET', K_INFO, node, ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. now)
return state(now, false, node, c)
