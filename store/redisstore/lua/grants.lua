-- Grants: ARGV node, count. Moves up to count of the node's grants, oldest
-- first, to its in-flight list, as BRPOPLPUSH moves one, and returns them,
-- oldest first: the grants that queued while the node took in others come
-- in one call.
local node = ARGV[1]
local r = redis.call('LMPOP', 1, k_grants(node), 'RIGHT', 'COUNT', ARGV[2])
if not r then return {} end
redis.call('LPUSH', k_inflight(node), unpack(r[2]))
return r[2]
