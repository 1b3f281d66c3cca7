-- wrk script: POST /recommend for a random known user with a bearer token; one JSON line at the end.
--   WRK_USERS=users.txt DYNAMIC_INTEREST_TOKEN=... wrk -t2 -c8 -d20s --latency -s wrk_recommend.lua URL
-- WRK_USERS holds one user id per line; WRK_PATH is the route (default /recommend). The last line
-- printed is "WRK_JSON {...}" (latencies in µs). WRK_HONOUR_RETRY_AFTER=1: after a 503 the next
-- request of the same wrk thread waits the answer's Retry-After seconds (a client that honours it;
-- a wrk thread's script state is shared by its connections, so run one thread per connection).
local users = {}
for line in io.lines(os.getenv("WRK_USERS")) do
  if #line > 0 then users[#users + 1] = line end
end
local path = os.getenv("WRK_PATH") or "/recommend"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("DYNAMIC_INTEREST_TOKEN") or "")

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  local user = users[math.random(#users)]
  return wrk.format(nil, path, nil, '{"user_id":"' .. user .. '","k":10}')
end

if os.getenv("WRK_HONOUR_RETRY_AFTER") == "1" then
  local waits = {}  -- one wait (ms) per 503 not yet honoured, oldest first
  function response(status, headers, body)
    if status == 503 then
      local s = tonumber(headers["Retry-After"] or headers["retry-after"] or "1") or 1
      waits[#waits + 1] = 1000 * s
    end
  end
  function delay()
    if #waits == 0 then return 0 end
    return table.remove(waits, 1)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"status_errors":%d,"timeouts":%d,"mean_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
