-- RegisterSweep: ARGV node, epoch of its registration, HSCAN cursor,
-- count: the last step of a registration in chunks. The node's tickets
-- that it did not name leave the line, about count per call.
-- Reply: the next cursor; "0" when the sweep is done.
local node = ARGV[1]
if redis.call('HGET', K_EPOCHS, node) ~= ARGV[2] then
	fail('registration ' .. ARGV[2] .. ' of node ' .. quote(node) .. ' was superseded')
end
local rs = k_reg(node)
local r = redis.call('HSCAN', k_tickets(node), ARGV[3], 'COUNT', ARGV[4])
local kv = r[2]
local gone = {}
for j = 1, #kv, 2 do
	if redis.call('SISMEMBER', rs, kv[j]) == 0 then gone[#gone + 1] = kv[j] end
end
drop_ticket_ids(node, gone)
if r[1] == '0' then redis.call('UNLINK', rs) end
return r[1]
