-- Give back what an ended (or refused) request held of its rate limits.
-- KEYS: limit keys; ARGV: member, then per key an operation and an amount:
--   'zrem'  leave a parallel set (the member);
--   'take'  take the admission's prompt bound back from a tpm minute, if that
--           minute's key still exists (an expired minute counts nothing any more);
--   'add'   count tokens in the minute the request ended in.
-- Reply: 'ok'
local member = ARGV[1]
for j = 1, #KEYS do
  local op, amount = ARGV[2 * j], ARGV[2 * j + 1]
  if op == 'zrem' then
    redis.call('ZREM', KEYS[j], member)
  elseif op == 'take' then
    if redis.call('EXISTS', KEYS[j]) == 1 then redis.call('DECRBY', KEYS[j], amount) end
  elseif op == 'add' then
    redis.call('INCRBY', KEYS[j], amount)
    if redis.call('PTTL', KEYS[j]) < 0 then redis.call('PEXPIRE', KEYS[j], 120000) end
  end
end
return 'ok'
