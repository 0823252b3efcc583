-- Status: ARGV node. Reply: {state(), nodes: flat (id, expiry ms, info)}.
-- Read only; costs O(nodes).
local node = ARGV[1]
local now = now_ms()
local c = cfg(true)
local exp = redis.call('ZSCORE', K_NODES, node)
local st = state(now, not exp or tonumber(exp) <= now, node, c, false)
local ns = redis.call('ZRANGE', K_NODES, 0, -1, 'WITHSCORES')
local out = {}
for j = 1, #ns, 2 do
	out[#out + 1] = ns[j]
	out[#out + 1] = ns[j + 1]
	out[#out + 1] = redis.call('HGET', K_INFO, ns[j]) or ''
end
return {st, out}
