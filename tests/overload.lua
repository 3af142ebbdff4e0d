-- wrk script for tests/test_overload.py: POSTs a valid notification with a unique request_id
-- each time, and records per response what wrk itself cannot: the status, whether a 503 carried
-- Retry-After and the `overloaded` code, and the latency of each accepted one (its request_id
-- carries the time it was sent, and the 202 answers it back).
--
-- The test fills in the placeholders below (path, headers, body, output files) before wrk reads it.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } notify_timespec;
int clock_gettime(int clk_id, notify_timespec *tp);
]]
local clock = ffi.new("notify_timespec")

local function now_us()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000000 + math.floor(tonumber(clock.tv_nsec) / 1000)
end

local PATH = "@PATH@"
local HEADERS = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer @KEY@" }
local BODY = [[@BODY@]] -- holds one %s: the request_id
local PREFIX = "@PREFIX@"
local ACCEPTED_FILE = "@ACCEPTED@"
local SUMMARY_FILE = "@SUMMARY@"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  sent = 0
  statuses = {}
  shed_ok = 0 -- 503 with Retry-After and error "overloaded"
  errors = {} -- every answer that is not a 202, by its error code
  accepted = {} -- "request_id latency_us", one per 202
end

function request()
  sent = sent + 1
  local request_id = string.format("%s-%d-%d-%d", PREFIX, tid, sent, now_us())
  return wrk.format("POST", PATH, HEADERS, string.format(BODY, request_id))
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 202 then
    local request_id, sent_at = string.match(body, '"request_id":"(' .. PREFIX .. '%-%d+%-%d+%-(%d+))"')
    if request_id then
      accepted[#accepted + 1] = request_id .. " " .. (now_us() - tonumber(sent_at))
    end
  else
    local code = key .. " " .. (string.match(body, '"error":"([%w_]+)"') or "?")
    errors[code] = (errors[code] or 0) + 1
    if status == 503 and headers["Retry-After"] and code == "503 overloaded" then
      shed_ok = shed_ok + 1
    end
  end
end

function done(summary, latency, requests)
  local totals, codes, shed, lines = {}, {}, 0, {}
  for _, thread in ipairs(threads) do
    for key, count in pairs(thread:get("statuses")) do
      totals[key] = (totals[key] or 0) + count
    end
    for key, count in pairs(thread:get("errors")) do
      codes[key] = (codes[key] or 0) + count
    end
    shed = shed + thread:get("shed_ok")
    for _, line in ipairs(thread:get("accepted")) do
      lines[#lines + 1] = line
    end
  end
  local out = io.open(ACCEPTED_FILE, "w")
  out:write(table.concat(lines, "\n"))
  out:close()
  local parts = {}
  for key, count in pairs(totals) do
    parts[#parts + 1] = string.format('"%s": %d', key, count)
  end
  local errors_json = {}
  for key, count in pairs(codes) do
    errors_json[#errors_json + 1] = string.format('"%s": %d', key, count)
  end
  local e = summary.errors
  out = io.open(SUMMARY_FILE, "w")
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "timeouts": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "shed_with_retry_after": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
      .. '"statuses": {%s}, "errors": {%s}}',
    summary.requests, summary.duration, e.timeout, e.connect, e.read, e.write, shed,
    latency:percentile(50), latency:percentile(99), latency.max, table.concat(parts, ", "),
    table.concat(errors_json, ", ")
  ))
  out:close()
end
