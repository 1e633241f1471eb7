-- chatmail accounts for Dovecot 2.4: Lua passdb and userdb asking doveauth.
--
-- Dovecot 2.4 has no dict or checkpassword passdb any more, so this script
-- forwards every lookup to doveauth over HTTP on its UNIX socket (the
-- socket_path lua_setting) and hands the answer back.  All rules (account
-- creation on first login, registration limits, disabled accounts) live in
-- doveauth; this script only translates.
--
--   POST /passdb  user=U&password=P  ->  result=ok&password={PLAIN}P[&user=U']
--                 (P verified by doveauth) or password={SHA512-CRYPT}... (it was not)
--   POST /userdb  user=U             ->  result=ok&home=...&uid=...&gid=...[&user=U']
--   GET  /users                      ->  one address per line
--   result=unknown                   ->  no such account (or creation refused)
--
-- Dovecot compares the password with the returned one (a wrong password gets
-- the stored hash, which Dovecot verifies and refuses).  Anything but
-- "200 result=..." (doveauth down, a timeout, a 5xx) is a temporary failure,
-- never a wrong password.
--
-- Runs in the auth worker (as the vmail user, see dovecot.conf).

local client = nil
local BASE = "http://doveauth"

local function form_escape(s)
  return (string.gsub(s, "[^%w%-%._~]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

local function form_unescape(s)
  s = string.gsub(s, "+", " ")
  return (string.gsub(s, "%%(%x%x)", function(h)
    return string.char(tonumber(h, 16))
  end))
end

local function parse_form(body)
  local fields = {}
  for pair in string.gmatch(body, "[^&]+") do
    local key, value = string.match(pair, "^([^=]*)=(.*)$")
    if key == nil then
      return nil
    end
    fields[form_unescape(key)] = form_unescape(value)
  end
  return fields
end

-- (fields, nil) on an answer from doveauth, (nil, error text) otherwise
local function ask(method, path, payload)
  local request = client:request({ url = BASE .. path, method = method })
  if payload ~= nil then
    request:add_header("Content-Type", "application/x-www-form-urlencoded")
    request:set_payload(payload)
  end
  local response = request:submit()
  local status = response:status()
  if status ~= 200 then
    return nil, "doveauth: " .. tostring(status) .. " " .. tostring(response:reason())
  end
  return response:payload(), nil
end

local function lookup(path, payload)
  local body, err = ask("POST", path, payload)
  if body == nil then
    return nil, err
  end
  local fields = parse_form(body)
  if fields == nil or fields.result == nil then
    return nil, "doveauth: unreadable answer"
  end
  return fields, nil
end

function script_init(args)
  if args.socket_path == nil or args.socket_path == "" then
    error("lua_settings { socket_path } (doveauth's HTTP socket) is missing")
  end
  client = dovecot.http.client({
    proxy_socket_path = args.socket_path,
    connect_timeout = "5s",
    request_timeout = "30s",
    request_max_attempts = "1",
    max_parallel_connections = "1",
  })
  return 0
end

function auth_passdb_lookup(req)
  local fields, err = lookup("/passdb",
    "user=" .. form_escape(req.user) .. "&password=" .. form_escape(req.password or ""))
  if fields == nil then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, err
  end
  if fields.result ~= "ok" then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such account"
  end
  fields.result = nil
  return dovecot.auth.PASSDB_RESULT_OK, fields
end

function auth_userdb_lookup(req)
  local fields, err = lookup("/userdb", "user=" .. form_escape(req.user))
  if fields == nil then
    return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, err
  end
  if fields.result ~= "ok" then
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such account"
  end
  fields.result = nil
  return dovecot.auth.USERDB_RESULT_OK, fields
end

-- every account, for `doveadm user '*'` and `doveadm ... -A`
function auth_userdb_iterate()
  local body, err = ask("GET", "/users", nil)
  if body == nil then
    error(err)
  end
  local users = {}
  for line in string.gmatch(body, "[^\n]+") do
    table.insert(users, line)
  end
  return users
end
