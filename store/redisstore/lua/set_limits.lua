-- SetLimits: ARGV from_config (0|1), in force: max, maxw, wait_ms, order,
-- config: max, maxw, wait_ms, order, fair share (JSON, see set_fair; ''
-- off). Reply: set_at (ms). A config's word the store already has changes
-- nothing: an override in force stays. An override leaves the fair share
-- as the config put it.
local now = now_ms()
if ARGV[1] == '1' then
	local v = redis.call('HMGET', K_CFG, 'cmax', 'cmaxw', 'cwait_ms', 'corder', 'cfair')
	if v[1] == ARGV[6] and v[2] == ARGV[7] and v[3] == ARGV[8] and v[4] == ARGV[9] and (v[5] or '') == ARGV[10] then
		return now
	end
end
local oldorder = redis.call('HGET', K_CFG, 'order')
redis.call('HSET', K_CFG, 'max', ARGV[2], 'maxw', ARGV[3], 'wait_ms', ARGV[4], 'order', ARGV[5],
	'cmax', ARGV[6], 'cmaxw', ARGV[7], 'cwait_ms', ARGV[8], 'corder', ARGV[9], 'set_at', now)
if ARGV[1] == '1' then
	redis.call('HSET', K_CFG, 'cfair', ARGV[10])
	set_fair(ARGV[10])
elseif oldorder ~= ARGV[5] then
	-- another order: every tenant's next waiter is another
	for _, t in ipairs(redis.call('SMEMBERS', K_WKEYS)) do mark(t) end
end
grant_all(cfg())
return now
