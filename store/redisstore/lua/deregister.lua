-- Deregister: ARGV node. The node leaves at once, as if reaped: its
-- tickets leave the line, what it held goes to the next waiters.
-- Reply: 1 if it was registered.
local node = ARGV[1]
local c = cfg()
local known = redis.call('ZSCORE', K_NODES, node)
for _, key in ipairs(reap(node)) do grant(key, c) end
return known and 1 or 0
