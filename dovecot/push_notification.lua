-- chatmail push hook for Dovecot 2.3 (push_notification_lua driver, LMTP only).
--
-- When LMTP stores a new message, tell chatmail-metadata by setting the
-- mailbox attribute /private/messagenew: Dovecot writes it through
-- mail_attribute_dict as "priv/<mailbox guid>/messagenew", and the metadata
-- daemon queues one push notification per device token of the account.
-- A copy of a message the account sent itself (From is the account) wakes
-- no device: the sending device is awake and the others fetch it anyway.
--
-- Wiring (dovecot.conf):
--   protocol lmtp { mail_plugins = $mail_plugins mail_lua notify push_notification push_notification_lua }
--   plugin { push_notification_driver = lua:file=<this file> }

local ATTRIBUTE = "/private/messagenew"

-- The transaction context handed to every event is just the mail user.
function dovecot_lua_notify_begin_txn(user)
  return user
end

local function sent_by_self(user, event)
  -- from_address is the parsed address of the From header ("" if none)
  local from = event.from_address
  if from == nil or from == "" then
    return false
  end
  return string.lower(from) == string.lower(user.username)
end

function dovecot_lua_notify_event_message_new(user, event)
  if sent_by_self(user, event) then
    return
  end
  local mailbox = user:mailbox(event.mailbox)
  -- a failure must not disturb the delivery itself: log it and go on
  local ok, err = pcall(function()
    -- attributes need an opened mailbox; a sync would be wasted work here
    mailbox:open()
    mailbox:metadata_set(ATTRIBUTE, "")
  end)
  mailbox:free()
  if not ok then
    dovecot.i_error("chatmail push hook: cannot set " .. ATTRIBUTE .. " for "
      .. user.username .. ": " .. tostring(err))
  end
end

function dovecot_lua_notify_end_txn(user)
end
