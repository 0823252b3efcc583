-- Give: ARGV node, key value, seq seen, lease ms. Reply: 1 if a slot was
-- freed, 0 if the node held none of key (it was reaped, or the store lost
-- its data), -1 if the store went back in time (register).
local node, key = ARGV[1], ARGV[2]
if went_back(ARGV[3], ARGV[4], nil) then return -1 end
local hh = k_held(node)
local h = int(redis.call('HGET', hh, key), 'held:' .. node)
if h <= 0 then return 0 end
if h == 1 then redis.call('HDEL', hh, key) else redis.call('HINCRBY', hh, key, '-1') end
if redis.call('HGET', K_CFG, 'fair') == '1' then
	-- a fair share: settle() grants the slot to the tenant whose turn it is
	add(K_ACTIVE, key, -1)
	add(K_TOT, 'a', -1)
	mark(key)
elseif redis.call('EXISTS', k_prios(key)) == 1 then
	-- someone waits: the slot goes straight to the next waiter, if the
	-- limit leaves room for it
	grant(key, cfg(), 1)
else
	add(K_ACTIVE, key, -1)
	add(K_TOT, 'a', -1)
end
return 1
