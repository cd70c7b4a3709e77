-- wrk script for the sink's own rate: POST a webhook-sized JSON body, as the workers do.
wrk.method = "POST"
wrk.body = '{"email":"buyer@example.com","plan":"pro","price":19.99,"status":"success","timestamp":"2026-11-27T21:00:00Z"}'
wrk.headers["Content-Type"] = "application/json"
