-- The json-body-map scenario: every request POSTs the same JSON document of about 2 KB (a user
-- and 18 line items), which the transform policy parses, maps and writes back.
local items = {}
for i = 1, 18 do
  items[#items + 1] = string.format(
    '{"id":%d,"sku":"SKU-%05d","name":"line item number %d","price":%d.99,"qty":%d,"internal":"warehouse-%02d"}',
    i, i, i, i * 3, i % 7 + 1, i)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"user":{"id":42,"name":"Ada Lovelace","email":"ada@example.com","internal_id":"u-00042"},'
  .. '"items":[' .. table.concat(items, ",") .. '],'
  .. '"shipping":{"method":"courier","address":{"street":"1 Main St","city":"Springfield","zip":"00001"}},'
  .. '"note":"bench"}'
