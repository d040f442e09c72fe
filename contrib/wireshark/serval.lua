-- Wireshark / tshark dissector for Serval in Rust: the SAL wire format, version 1.
--
-- What it decodes, as docs/wire.md and docs/protocol.md define it (the code in crates/wire and
-- crates/engine/src/frame.rs is the reference):
--   * the 20-byte base header (with the key-phase bit) and every extension (CONTROL, SERVICE,
--     NONCE, KEYSHARE, IDENTITY, COOKIE, SOURCE, AUTH, PAD, unknown ones), checked in the order
--     SalPacket::validate checks them;
--   * packet protection (wire.md §12): every packet of a flow after the SYN (a non-zero
--     destination flowID; a router's NACK excepted) is `header | packet number | payload |
--     tag`. The packet number and the 16-byte tag are shown; the payload is shown as encrypted
--     bytes, unless the flow runs in plaintext, which the dissector knows from the flow's
--     SYN-ACK (KEYSHARE flag 0x01) if the capture holds it. Nothing is decrypted or verified;
--   * protocol 1 (stream) of plaintext flows: the frames (PADDING, PING, ACK with its ranges,
--     STREAM / STREAM+FIN, MAX_DATA, DATAGRAM, CLOSE, PATH_CHALLENGE, PATH_RESPONSE,
--     MOVE_REQUEST, MOVE_REFUSED);
--   * protocol 2 (datagram): the flags byte, the sender's serviceID, the data;
--   * protocol 3 (registration): REGISTER, UNREGISTER, ACK, REJECT, COOKIE, in the 60-, 76-
--     (cookie) and 140-byte (signed) forms.
-- Anything malformed is shown as an expert-info error naming the rule it breaks (the WireError,
-- FrameError or RegError of the Rust code); the dissector itself never raises a Lua error.
--
-- It is registered on UDP ports 54324 (endpoints and routers) and 54323 (the discovery group),
-- and as a heuristic dissector for UDP that claims a datagram only if the whole SAL header
-- validates, so traffic on ephemeral ports decodes too. See README.md next to this file.
--
-- Written for the Wireshark Lua API of 3.x and later (tested with 4.0), in Lua that every version
-- Wireshark embeds accepts: no bit operators, no integer division.

local serval = Proto("serval", "Serval Service Access Layer")

local VERSION = 1
local BASE_LEN = 20
local MAX_PACKET_LEN = 65507
local DEFAULT_PORT = 54324
local DISCOVERY_PORT = 54323
local REG_PAYLOAD_LEN, REG_COOKIE_PAYLOAD_LEN, REG_SIGNED_PAYLOAD_LEN = 60, 76, 140
local PN_LEN = 8
local TAG_LEN = 16
local MAX_ACK_RANGES = 256

local PROTOCOLS = { [0] = "none", [1] = "stream", [2] = "datagram", [3] = "registration" }

local EXT_PAD, EXT_CONTROL, EXT_SERVICE, EXT_NONCE, EXT_SOURCE, EXT_AUTH = 0x00, 0x81, 0x82, 0x83, 0x84, 0x85
local EXT_KEYSHARE, EXT_IDENTITY, EXT_COOKIE = 0x86, 0x87, 0x88
local EXT_NAMES = {
    [EXT_PAD] = "PAD",
    [EXT_CONTROL] = "CONTROL",
    [EXT_SERVICE] = "SERVICE",
    [EXT_NONCE] = "NONCE",
    [EXT_SOURCE] = "SOURCE",
    [EXT_AUTH] = "AUTH",
    [EXT_KEYSHARE] = "KEYSHARE",
    [EXT_IDENTITY] = "IDENTITY",
    [EXT_COOKIE] = "COOKIE",
}
local EXT_FIXED_LEN = { [EXT_CONTROL] = 12, [EXT_SERVICE] = 36, [EXT_NONCE] = 18, [EXT_AUTH] = 18,
    [EXT_KEYSHARE] = 36, [EXT_IDENTITY] = 100, [EXT_COOKIE] = 22 }
local KEYSHARE_GROUPS = { [1] = "X25519" }
local IDENTITY_KINDS = { [1] = "Ed25519" }

local FLAG_NAMES = { { 0x0001, "SYN" }, { 0x0002, "ACK" }, { 0x0004, "RSYN" }, { 0x0008, "NACK" },
    { 0x0010, "RST" }, { 0x0020, "FIN" }, { 0x0040, "JOIN" } }

-- COOKIE (5) exists only in the 76- and 140-byte forms.
local REG_TYPES = { [1] = "REGISTER", [2] = "UNREGISTER", [3] = "ACK", [4] = "REJECT", [5] = "COOKIE" }
local REJECT_REASONS = { [0] = "none", [1] = "NOT_ACCEPTED", [2] = "UNAVAILABLE", [3] = "LIMIT",
    [4] = "UNAUTHORIZED", [5] = "COOKIE_REQUIRED" }

local FR_PADDING, FR_PING, FR_ACK, FR_STREAM, FR_STREAM_FIN, FR_MAX_DATA, FR_CLOSE, FR_DATAGRAM =
    0x00, 0x01, 0x02, 0x08, 0x09, 0x10, 0x1c, 0x30
local FR_PATH_CHALLENGE, FR_PATH_RESPONSE, FR_MOVE_REQUEST, FR_MOVE_REFUSED = 0x1a, 0x1b, 0x1d, 0x1e
local FRAME_NAMES = {
    [FR_PADDING] = "PADDING",
    [FR_PING] = "PING",
    [FR_ACK] = "ACK",
    [FR_STREAM] = "STREAM",
    [FR_STREAM_FIN] = "STREAM+FIN",
    [FR_MAX_DATA] = "MAX_DATA",
    [FR_CLOSE] = "CLOSE",
    [FR_DATAGRAM] = "DATAGRAM",
    [FR_PATH_CHALLENGE] = "PATH_CHALLENGE",
    [FR_PATH_RESPONSE] = "PATH_RESPONSE",
    [FR_MOVE_REQUEST] = "MOVE_REQUEST",
    [FR_MOVE_REFUSED] = "MOVE_REFUSED",
}
local MOVE_REFUSALS = { [1] = "NO_AGENT", [2] = "NOT_MOVABLE", [3] = "UNREACHABLE", [4] = "REFUSED_THERE",
    [5] = "FAILED" }

local LOC_FAMILIES = { [4] = "IPv4", [6] = "IPv6" }

-- Fields ----------------------------------------------------------------------------------------

local f = {
    version = ProtoField.uint8("serval.version", "Version", base.DEC, nil, 0xf0),
    key_phase = ProtoField.bool("serval.key_phase", "Key phase", 8, nil, 0x01),
    reserved = ProtoField.uint8("serval.reserved", "Reserved flags", base.HEX, nil, 0x0e),
    protocol = ProtoField.uint8("serval.protocol", "Protocol", base.DEC, PROTOCOLS),
    hdr_len = ProtoField.uint16("serval.hdr_len", "Header Length", base.DEC),
    src_flowid = ProtoField.uint64("serval.src_flowid", "Source FlowID", base.HEX),
    dst_flowid = ProtoField.uint64("serval.dst_flowid", "Destination FlowID", base.HEX),

    ext = ProtoField.none("serval.ext", "Extension"),
    ext_type = ProtoField.uint8("serval.ext.type", "Type", base.HEX, EXT_NAMES),
    ext_mandatory = ProtoField.bool("serval.ext.mandatory", "Must understand", 8, nil, 0x80),
    ext_len = ProtoField.uint8("serval.ext.len", "Length", base.DEC),
    ext_data = ProtoField.bytes("serval.ext.data", "Body"),

    flags = ProtoField.uint16("serval.flags", "Flags", base.HEX),
    flag_syn = ProtoField.bool("serval.flags.syn", "SYN", 16, nil, 0x0001),
    flag_ack = ProtoField.bool("serval.flags.ack", "ACK", 16, nil, 0x0002),
    flag_rsyn = ProtoField.bool("serval.flags.rsyn", "RSYN", 16, nil, 0x0004),
    flag_nack = ProtoField.bool("serval.flags.nack", "NACK", 16, nil, 0x0008),
    flag_rst = ProtoField.bool("serval.flags.rst", "RST", 16, nil, 0x0010),
    flag_fin = ProtoField.bool("serval.flags.fin", "FIN", 16, nil, 0x0020),
    flag_join = ProtoField.bool("serval.flags.join", "JOIN", 16, nil, 0x0040),
    flag_reserved = ProtoField.uint16("serval.flags.reserved", "Reserved", base.HEX, nil, 0xff80),
    verno = ProtoField.uint32("serval.verno", "Verification Number (verno)", base.DEC),
    ackno = ProtoField.uint32("serval.ackno", "Acknowledgement Number (ackno)", base.DEC),

    hop_limit = ProtoField.uint8("serval.hop_limit", "Hop Limit", base.DEC),
    service_reserved = ProtoField.uint8("serval.service.reserved", "Reserved", base.HEX),
    service_id = ProtoField.bytes("serval.service_id", "Destination ServiceID"),

    nonce = ProtoField.bytes("serval.nonce", "Nonce"),

    source_count = ProtoField.uint8("serval.source.count", "Locators", base.DEC),
    source_locator = ProtoField.string("serval.source.locator", "Locator"),
    source_family = ProtoField.uint8("serval.source.family", "Family", base.DEC, LOC_FAMILIES),
    source_port = ProtoField.uint16("serval.source.port", "UDP Port", base.DEC),
    source_ipv4 = ProtoField.ipv4("serval.source.ipv4", "IPv4 Address"),
    source_ipv6 = ProtoField.ipv6("serval.source.ipv6", "IPv6 Address"),

    keyshare_group = ProtoField.uint8("serval.keyshare.group", "Group", base.DEC, KEYSHARE_GROUPS),
    keyshare_flags = ProtoField.uint8("serval.keyshare.flags", "Flags", base.HEX),
    keyshare_plaintext = ProtoField.bool("serval.keyshare.plaintext", "Plaintext", 8, nil, 0x01),
    keyshare_identity = ProtoField.bool("serval.keyshare.identity", "Identity proof asked", 8, nil, 0x02),
    keyshare_reserved = ProtoField.uint8("serval.keyshare.reserved", "Reserved", base.HEX, nil, 0xfc),
    keyshare_key = ProtoField.bytes("serval.keyshare.key", "Public Key"),

    identity_kind = ProtoField.uint8("serval.identity.kind", "Kind", base.DEC, IDENTITY_KINDS),
    identity_reserved = ProtoField.uint8("serval.identity.reserved", "Reserved", base.HEX),
    identity_key = ProtoField.bytes("serval.identity.key", "Server Public Key"),
    identity_signature = ProtoField.bytes("serval.identity.signature", "Signature"),

    cookie = ProtoField.bytes("serval.cookie", "Cookie Token"),

    auth_tag = ProtoField.bytes("serval.auth_tag", "Authentication Tag"),

    -- packet protection (wire.md §12)
    pn = ProtoField.uint64("serval.pn", "Packet Number", base.DEC),
    pn_space = ProtoField.string("serval.pn.space", "Packet number space"),
    flow_plaintext = ProtoField.bool("serval.flow.plaintext", "Plaintext flow"),
    flow_synack = ProtoField.framenum("serval.flow.synack", "Flow's SYN-ACK in frame", base.NONE),
    encrypted = ProtoField.bytes("serval.encrypted", "Encrypted payload"),
    tag = ProtoField.bytes("serval.tag", "AEAD Tag"),

    payload = ProtoField.bytes("serval.payload", "Payload"),

    -- a UDP GSO batch seen before segmentation (see gso_segment_size)
    gso_segment = ProtoField.uint16("serval.gso.segment", "GSO segment", base.DEC),
    gso_segments = ProtoField.uint16("serval.gso.segments", "GSO segments in the datagram", base.DEC),
    gso_segment_size = ProtoField.uint16("serval.gso.segment_size", "GSO segment size", base.DEC),

    -- the payload subtrees
    stream = ProtoField.none("serval.stream", "Stream transport"),
    datagram = ProtoField.none("serval.dgram", "Datagram"),
    registration = ProtoField.none("serval.reg", "Registration"),

    -- protocol 1: the stream transport
    frame = ProtoField.none("serval.frame", "Frame"),
    frame_type = ProtoField.uint8("serval.frame.type", "Frame Type", base.HEX, FRAME_NAMES),
    padding_len = ProtoField.uint32("serval.padding.len", "Padding bytes", base.DEC),
    ack_largest = ProtoField.uint64("serval.ack.largest", "Largest Acknowledged", base.DEC),
    ack_delay = ProtoField.uint64("serval.ack.delay", "ACK Delay (us)", base.DEC),
    ack_range_count = ProtoField.uint64("serval.ack.range_count", "ACK Range Count", base.DEC),
    ack_first_range = ProtoField.uint64("serval.ack.first_range", "First ACK Range", base.DEC),
    ack_gap = ProtoField.uint64("serval.ack.gap", "Gap", base.DEC),
    ack_range_len = ProtoField.uint64("serval.ack.range_len", "ACK Range Length", base.DEC),
    ack_range = ProtoField.string("serval.ack.range", "Acknowledged packet numbers"),
    stream_offset = ProtoField.uint64("serval.stream.offset", "Offset", base.DEC),
    stream_length = ProtoField.uint64("serval.stream.length", "Length", base.DEC),
    stream_fin = ProtoField.bool("serval.stream.fin", "FIN"),
    stream_data = ProtoField.bytes("serval.stream.data", "Stream Data"),
    max_data = ProtoField.uint64("serval.max_data", "Maximum Data", base.DEC),
    frame_dgram_len = ProtoField.uint64("serval.frame.datagram.length", "Length", base.DEC),
    frame_dgram_data = ProtoField.bytes("serval.frame.datagram.data", "Datagram Data"),
    close_code = ProtoField.uint64("serval.close.code", "Error Code", base.DEC),
    close_reason_len = ProtoField.uint64("serval.close.reason_len", "Reason Length", base.DEC),
    close_reason = ProtoField.string("serval.close.reason", "Reason"),
    path_data = ProtoField.bytes("serval.path.data", "Path Data"),
    move_to = ProtoField.string("serval.move.to", "Move To (agent)"),
    move_refusal = ProtoField.uint8("serval.move.refusal", "Move Refused", base.DEC, MOVE_REFUSALS),

    -- protocol 2: datagrams by name
    dgram_flags = ProtoField.uint8("serval.dgram.flags", "Datagram Flags", base.HEX),
    dgram_has_service = ProtoField.bool("serval.dgram.has_service", "Sender serviceID follows", 8, nil, 0x01),
    dgram_service_id = ProtoField.bytes("serval.dgram.service_id", "Sender ServiceID"),
    dgram_data = ProtoField.bytes("serval.dgram.data", "Data"),

    -- protocol 3: registration
    reg_type = ProtoField.uint8("serval.reg.type", "Type", base.DEC, REG_TYPES),
    reg_reason = ProtoField.uint8("serval.reg.reason", "Reason", base.DEC, REJECT_REASONS),
    reg_prefix_len = ProtoField.uint16("serval.reg.prefix_len", "Prefix Length", base.DEC),
    reg_request_id = ProtoField.uint32("serval.reg.request_id", "Request ID", base.HEX),
    reg_instance = ProtoField.uint64("serval.reg.instance", "Instance", base.HEX),
    reg_weight = ProtoField.uint32("serval.reg.weight", "Weight", base.DEC),
    reg_priority = ProtoField.uint32("serval.reg.priority", "Priority", base.DEC),
    reg_ttl = ProtoField.uint32("serval.reg.ttl", "TTL (ms)", base.DEC),
    reg_prefix_id = ProtoField.bytes("serval.reg.prefix_id", "Service Prefix ID"),
    reg_prefix = ProtoField.string("serval.reg.prefix", "Service Prefix"),
    reg_cookie = ProtoField.bytes("serval.reg.cookie", "Cookie"),
    reg_signature = ProtoField.bytes("serval.reg.signature", "Signature"),
}

local field_list = {}
for _, v in pairs(f) do
    field_list[#field_list + 1] = v
end
serval.fields = field_list

local e = {
    malformed = ProtoExpert.new("serval.malformed", "Malformed SAL packet", expert.group.MALFORMED,
        expert.severity.ERROR),
    frame_malformed = ProtoExpert.new("serval.frame.malformed", "Malformed stream transport payload",
        expert.group.MALFORMED, expert.severity.ERROR),
    dgram_malformed = ProtoExpert.new("serval.dgram.malformed", "Malformed datagram payload",
        expert.group.MALFORMED, expert.severity.ERROR),
    reg_malformed = ProtoExpert.new("serval.reg.malformed", "Malformed registration message",
        expert.group.MALFORMED, expert.severity.ERROR),
    protect_malformed = ProtoExpert.new("serval.protection.malformed",
        "Protected packet too short for a packet number and a tag", expert.group.MALFORMED,
        expert.severity.ERROR),
    snapped = ProtoExpert.new("serval.snapped", "Packet not captured in full", expert.group.MALFORMED,
        expert.severity.WARN),
    unknown_ext = ProtoExpert.new("serval.ext.unknown", "Unknown extension skipped", expert.group.UNDECODED,
        expert.severity.NOTE),
    internal = ProtoExpert.new("serval.internal_error", "Serval dissector error", expert.group.MALFORMED,
        expert.severity.ERROR),
}
serval.experts = { e.malformed, e.frame_malformed, e.dgram_malformed, e.reg_malformed,
    e.protect_malformed, e.snapped, e.unknown_ext, e.internal }

serval.prefs.assume_plaintext = Pref.bool("Assume plaintext for flows whose SYN-ACK is not captured",
    false, "A flow runs in plaintext only if its SYN-ACK grants it (KEYSHARE flag 0x01); when the " ..
    "capture does not hold the SYN-ACK, show the flow's payloads as plaintext frames rather than " ..
    "as encrypted bytes")

-- Helpers ---------------------------------------------------------------------------------------

local function hex(tvb, off, len)
    if len == 0 then
        return ""
    end
    return tostring(tvb(off, len):bytes()):lower()
end

local function flag_names(bits)
    local names = {}
    for _, fl in ipairs(FLAG_NAMES) do
        if math.floor(bits / fl[1]) % 2 == 1 then
            names[#names + 1] = fl[2]
        end
    end
    return table.concat(names, "|")
end

-- A QUIC variable-length integer (RFC 9000 §16) at `off`, reading no further than `limit`.
-- Returns the value (UInt64) and its length, or nil if it runs past `limit`.
local function varint(tvb, off, limit)
    if off + 1 > limit then
        return nil
    end
    local first = tvb(off, 1):uint()
    local len = 2 ^ math.floor(first / 64)
    len = math.floor(len + 0.5)
    if off + len > limit then
        return nil
    end
    local v
    if len == 8 then
        v = tvb(off, 8):uint64():band(UInt64.new(0xffffffff, 0x3fffffff))
    else
        v = UInt64.new(tvb(off, len):uint() % (2 ^ (8 * len - 2)))
    end
    return v, len
end

-- Whether `n` bytes at `off` are well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates,
-- nothing above U+10FFFF).
local function is_utf8(tvb, off, n)
    local i, stop = off, off + n
    while i < stop do
        local b = tvb(i, 1):uint()
        local extra, min
        if b < 0x80 then
            extra, min = 0, 0
        elseif b >= 0xc2 and b <= 0xdf then
            extra, min = 1, 0x80
        elseif b >= 0xe0 and b <= 0xef then
            extra, min = 2, 0x800
        elseif b >= 0xf0 and b <= 0xf4 then
            extra, min = 3, 0x10000
        else
            return false
        end
        if i + 1 + extra > stop then
            return false
        end
        local cp = extra == 0 and b or (b % (2 ^ (6 - extra)))
        for k = 1, extra do
            local c = tvb(i + k, 1):uint()
            if c < 0x80 or c > 0xbf then
                return false
            end
            cp = cp * 64 + (c - 0x80)
        end
        if cp < min or cp > 0x10ffff or (cp >= 0xd800 and cp <= 0xdfff) then
            return false
        end
        i = i + 1 + extra
    end
    return true
end

local function u64_is_zero(tvb, off)
    return tvb(off, 8):uint64() == UInt64.new(0)
end

-- The locator at `off` (a family byte, a port, 4 or 16 address bytes) within `limit`.
-- Returns its text, its length, or nil and the WireError-style reason.
local function locator_text(tvb, off, limit)
    local family = tvb(off, 1):uint()
    local need
    if family == 4 then
        need = 7
    elseif family == 6 then
        need = 19
    else
        return nil, 1, "BadFamily: locator family " .. family
    end
    if off + need > limit then
        return nil, limit - off, "locator truncated"
    end
    local port = tvb(off + 1, 2):uint()
    if family == 4 then
        return tostring(tvb(off + 3, 4):ipv4()) .. ":" .. port, need
    end
    return "[" .. tostring(tvb(off + 3, 16):ipv6()) .. "]:" .. port, need
end

-- Parsing the SAL header -------------------------------------------------------------------------

-- Checks the header as SalPacket::validate does, in its order, and records each extension.
-- Returns a table: version, protocol, hdr_len, exts (a list of {ty, off, len, locs}), and, at the
-- first failure, err = {msg, off, len} (err.snapped if the capture, not the packet, is short).
-- `cap` is the captured length, `rep` the length of the UDP payload on the wire.
local function parse_header(tvb)
    local cap = tvb:len()
    local rep = tvb:reported_length_remaining()
    local h = { cap = cap, rep = rep, exts = {} }
    local function fail(msg, off, len)
        h.err = { msg = msg, off = off, len = len }
        return h
    end
    if cap == 0 then
        return fail("Truncated: empty packet", 0, 0)
    end
    h.version = math.floor(tvb(0, 1):uint() / 16)
    if h.version ~= VERSION then
        return fail("BadVersion: unsupported SAL version " .. h.version .. " (expected 1)", 0, 1)
    end
    if rep < BASE_LEN then
        return fail("Truncated: " .. rep .. " bytes, shorter than the 20-byte base header", 0, cap)
    end
    if cap < BASE_LEN then
        h.err = { msg = "only " .. cap .. " bytes captured", off = 0, len = cap, snapped = true }
        return h
    end
    h.base = true
    h.protocol = tvb(1, 1):uint()
    h.hdr_len = tvb(2, 2):uint()
    if rep > MAX_PACKET_LEN then
        return fail("Oversize: packet of " .. rep .. " bytes exceeds the 65507-byte maximum", 0, cap)
    end
    if h.hdr_len < BASE_LEN then
        return fail("HeaderLenTooShort: header length " .. h.hdr_len ..
            " is shorter than the 20-byte base header", 2, 2)
    end
    if h.hdr_len > rep then
        return fail("HeaderLenBeyondPacket: header length " .. h.hdr_len .. " runs past the end of the " ..
            rep .. "-byte packet", 2, 2)
    end
    if h.hdr_len > cap then
        h.err = { msg = "header of " .. h.hdr_len .. " bytes, only " .. cap .. " captured", off = 0, len = cap,
            snapped = true }
        return h
    end
    local seen = {}
    local auth_seen = false
    local off = BASE_LEN
    local hdr_len = h.hdr_len
    while off < hdr_len do
        local ty = tvb(off, 1):uint()
        local tyname = string.format("0x%02x", ty)
        if off + 2 > hdr_len then
            return fail("ExtOverrun: extension " .. tyname .. " at offset " .. off ..
                " runs past the header length", off, hdr_len - off)
        end
        local len = tvb(off + 1, 1):uint()
        if len < 2 then
            return fail("ExtTooShort: extension " .. tyname .. " has length " .. len ..
                ", below the 2-byte minimum", off, 2)
        end
        if off + len > hdr_len then
            return fail("ExtOverrun: extension " .. tyname .. " at offset " .. off ..
                " runs past the header length", off, hdr_len - off)
        end
        local x = { ty = ty, off = off, len = len }
        local fixed = EXT_FIXED_LEN[ty]
        if fixed and len ~= fixed then
            return fail("ExtBadLen: extension " .. tyname .. " has length " .. len .. ", expected " .. fixed,
                off, len)
        end
        if ty == EXT_SOURCE then
            x.locs = {}
            local pos = off + 2
            local texts = {}
            while pos < off + len do
                local text, n, why = locator_text(tvb, pos, off + len)
                if not text then
                    if why == "locator truncated" then
                        why = "SourceTruncated: SOURCE of length " .. len .. " ends inside a locator"
                    end
                    return fail(why, pos, n)
                end
                if texts[text] then
                    return fail("SourceLoop: locator " .. text .. " appears twice in SOURCE", pos, n)
                end
                texts[text] = true
                x.locs[#x.locs + 1] = { off = pos, len = n, text = text }
                pos = pos + n
            end
            if #x.locs == 0 then
                return fail("SourceEmpty: SOURCE holds no locator", off, len)
            end
        end
        local known = EXT_NAMES[ty] ~= nil
        if not known and ty >= 0x80 then
            return fail("UnknownMandatory: unknown extension " .. tyname ..
                " has the must-understand bit set", off, len)
        end
        if known and ty ~= EXT_PAD then
            if seen[ty] then
                return fail("DuplicateExt: extension " .. tyname .. " appears more than once", off, len)
            end
            seen[ty] = true
        end
        if ty == EXT_CONTROL and #h.exts ~= 0 then
            return fail("ControlNotFirst: CONTROL extension is not the first extension", off, len)
        end
        if auth_seen then
            return fail("AuthNotLast: AUTH extension is not the last extension", off, len)
        end
        auth_seen = ty == EXT_AUTH
        h.exts[#h.exts + 1] = x
        off = off + len
    end
    return h
end

-- Rendering ---------------------------------------------------------------------------------------

local function add_error(tree, ex, tvb, err)
    if err.len and err.len > 0 then
        tree:add_tvb_expert_info(ex, tvb(err.off, err.len), err.msg)
    else
        tree:add_proto_expert_info(ex, err.msg)
    end
end

-- Adds one extension to `tree`; returns a summary for the Info column.
local function render_ext(tvb, tree, x, info)
    local r = tvb(x.off, x.len)
    local name = EXT_NAMES[x.ty] or string.format("unknown 0x%02x", x.ty)
    local t = tree:add(f.ext, r)
    t:set_text(name .. " extension (" .. x.len .. " bytes)")
    t:add(f.ext_type, tvb(x.off, 1))
    t:add(f.ext_mandatory, tvb(x.off, 1))
    t:add(f.ext_len, tvb(x.off + 1, 1))
    local body = x.off + 2
    if x.ty == EXT_CONTROL then
        local bits = tvb(body, 2):uint()
        local ft = t:add(f.flags, tvb(body, 2))
        ft:append_text(" (" .. flag_names(bits) .. ")")
        for _, k in ipairs({ "flag_syn", "flag_ack", "flag_rsyn", "flag_nack", "flag_rst", "flag_fin", "flag_join",
            "flag_reserved" }) do
            ft:add(f[k], tvb(body, 2))
        end
        t:add(f.verno, tvb(body + 2, 4))
        t:add(f.ackno, tvb(body + 6, 4))
        local names = flag_names(bits)
        t:append_text(": " .. (names ~= "" and names or "no flags") .. ", verno " .. tvb(body + 2, 4):uint() ..
            ", ackno " .. tvb(body + 6, 4):uint())
        info.flags = names
        info.ctl_bits = bits
    elseif x.ty == EXT_SERVICE then
        t:add(f.hop_limit, tvb(body, 1))
        t:add(f.service_reserved, tvb(body + 1, 1))
        t:add(f.service_id, tvb(body + 2, 32))
        info.service = hex(tvb, body + 2, 32)
        t:append_text(": " .. info.service .. ", hop limit " .. tvb(body, 1):uint())
    elseif x.ty == EXT_NONCE then
        t:add(f.nonce, tvb(body, 16))
    elseif x.ty == EXT_AUTH then
        t:add(f.auth_tag, tvb(body, 16))
    elseif x.ty == EXT_IDENTITY then
        t:add(f.identity_kind, tvb(body, 1))
        t:add(f.identity_reserved, tvb(body + 1, 1))
        t:add(f.identity_key, tvb(body + 2, 32))
        t:add(f.identity_signature, tvb(body + 34, 64))
    elseif x.ty == EXT_COOKIE then
        t:add(f.cookie, tvb(body, 20))
        info.cookie = true
    elseif x.ty == EXT_KEYSHARE then
        local group = tvb(body, 1):uint()
        local flags = tvb(body + 1, 1):uint()
        t:add(f.keyshare_group, tvb(body, 1))
        local ft = t:add(f.keyshare_flags, tvb(body + 1, 1))
        ft:add(f.keyshare_plaintext, tvb(body + 1, 1))
        ft:add(f.keyshare_identity, tvb(body + 1, 1))
        ft:add(f.keyshare_reserved, tvb(body + 1, 1))
        t:add(f.keyshare_key, tvb(body + 2, 32))
        info.keyshare_plaintext = flags % 2 == 1
        t:append_text(": " .. (KEYSHARE_GROUPS[group] or ("group " .. group)) ..
            (info.keyshare_plaintext and ", plaintext" or ""))
    elseif x.ty == EXT_SOURCE then
        t:add(f.source_count, tvb(x.off + 1, 1), #x.locs):set_generated()
        local texts = {}
        for i, loc in ipairs(x.locs) do
            local lt = t:add(f.source_locator, tvb(loc.off, loc.len), loc.text)
            lt:prepend_text(i == 1 and "(original sender) " or "(router " .. (i - 1) .. ") ")
            lt:add(f.source_family, tvb(loc.off, 1))
            lt:add(f.source_port, tvb(loc.off + 1, 2))
            if loc.len == 7 then
                lt:add(f.source_ipv4, tvb(loc.off + 3, 4))
            else
                lt:add(f.source_ipv6, tvb(loc.off + 3, 16))
            end
            texts[#texts + 1] = loc.text
        end
        t:append_text(": " .. table.concat(texts, ", "))
        info.source = texts
    else
        if x.len > 2 then
            t:add(f.ext_data, tvb(body, x.len - 2))
        end
        if EXT_NAMES[x.ty] == nil then
            t:add_proto_expert_info(e.unknown_ext, string.format("unknown extension 0x%02x skipped", x.ty))
        end
    end
end

-- Protocol 1: the frames from `off` to `limit`, after the packet number if `with_pn` (a
-- protected packet's packet number is shown by render_protected). Returns a summary.
local function render_stream(tvb, off, limit, tree, with_pn)
    local t = tree:add(f.stream, tvb(off, limit - off))
    local summary = {}
    local pos = off
    if with_pn then
        if off + PN_LEN > limit then
            t:add_tvb_expert_info(e.frame_malformed, tvb(off, limit - off),
                "Truncated: shorter than the 8-byte packet number")
            return "truncated"
        end
        t:add(f.pn, tvb(off, PN_LEN))
        summary[1] = "pn=" .. tostring(tvb(off, PN_LEN):uint64())
        pos = off + PN_LEN
    end
    while pos < limit do
        local start = pos
        local ty = tvb(pos, 1):uint()
        pos = pos + 1
        local name = FRAME_NAMES[ty]
        local ft = t:add(f.frame, tvb(start, 1))
        ft:set_text((name or string.format("unknown 0x%02x", ty)) .. " frame")
        ft:add(f.frame_type, tvb(start, 1))
        local function malformed(msg)
            ft:add_tvb_expert_info(e.frame_malformed, tvb(start, limit - start), msg)
            summary[#summary + 1] = "malformed"
            return table.concat(summary, " ")
        end
        -- reads a varint into field `fld`; nil at the end of the payload
        local function vi(fld)
            local v, n = varint(tvb, pos, limit)
            if not v then
                return nil
            end
            ft:add(fld, tvb(pos, n), v)
            pos = pos + n
            return v
        end
        local trunc = "Truncated: the transport payload ends inside the " .. (name or "") .. " frame"
        if not name then
            return malformed(string.format("UnknownFrame: unknown frame type 0x%02x", ty))
        elseif ty == FR_PADDING then
            while pos < limit and tvb(pos, 1):uint() == 0 do
                pos = pos + 1
            end
            ft:add(f.padding_len, tvb(start, pos - start), pos - start)
            summary[#summary + 1] = "PADDING(" .. (pos - start) .. ")"
        elseif ty == FR_PING then
            summary[#summary + 1] = "PING"
        elseif ty == FR_ACK then
            local largest = vi(f.ack_largest)
            local delay = largest and vi(f.ack_delay)
            local count = delay and vi(f.ack_range_count)
            if not count then
                return malformed(trunc)
            end
            if count >= UInt64.new(MAX_ACK_RANGES) then
                return malformed("BadAck: " .. tostring(count) .. " ranges, at most 255 are read")
            end
            local first = vi(f.ack_first_range)
            if not first then
                return malformed(trunc)
            end
            if first > largest then
                return malformed("BadAck: the first range runs below packet number 0")
            end
            local hi, lo = largest, largest - first
            local ranges = { tostring(lo) .. "-" .. tostring(hi) }
            ft:add(f.ack_range, tvb(start, pos - start), ranges[1]):set_generated()
            for _ = 1, count:tonumber() do
                local gap = vi(f.ack_gap)
                local rlen = gap and vi(f.ack_range_len)
                if not rlen then
                    return malformed(trunc)
                end
                -- RFC 9000 §19.3.1: the next largest is the previous smallest - gap - 2.
                if lo < gap + UInt64.new(2) then
                    return malformed("BadAck: a range runs below packet number 0")
                end
                hi = lo - gap - UInt64.new(2)
                if hi < rlen then
                    return malformed("BadAck: a range runs below packet number 0")
                end
                lo = hi - rlen
                local text = tostring(lo) .. "-" .. tostring(hi)
                ranges[#ranges + 1] = text
                ft:add(f.ack_range, tvb(start, pos - start), text):set_generated()
            end
            summary[#summary + 1] = "ACK(" .. table.concat(ranges, ",") .. ")"
        elseif ty == FR_STREAM or ty == FR_STREAM_FIN then
            local offset = vi(f.stream_offset)
            local len = offset and vi(f.stream_length)
            if not len then
                return malformed(trunc)
            end
            if offset + len > UInt64.new(0xffffffff, 0x3fffffff) then
                return malformed("OffsetOverflow: the stream frame ends beyond 2^62")
            end
            ft:add(f.stream_fin, tvb(start, 1), ty == FR_STREAM_FIN)
            if len > UInt64.new(limit - pos) then
                return malformed(trunc)
            end
            local n = len:tonumber()
            if n > 0 then
                ft:add(f.stream_data, tvb(pos, n))
            end
            pos = pos + n
            summary[#summary + 1] = name .. "(off=" .. tostring(offset) .. ",len=" .. n .. ")"
        elseif ty == FR_MAX_DATA then
            local v = vi(f.max_data)
            if not v then
                return malformed(trunc)
            end
            summary[#summary + 1] = "MAX_DATA(" .. tostring(v) .. ")"
        elseif ty == FR_DATAGRAM then
            local len = vi(f.frame_dgram_len)
            if not len then
                return malformed(trunc)
            end
            if len > UInt64.new(limit - pos) then
                return malformed(trunc)
            end
            local n = len:tonumber()
            if n > 0 then
                ft:add(f.frame_dgram_data, tvb(pos, n))
            end
            pos = pos + n
            summary[#summary + 1] = "DATAGRAM(" .. n .. ")"
        elseif ty == FR_CLOSE then
            local code = vi(f.close_code)
            local len = code and vi(f.close_reason_len)
            if not len then
                return malformed(trunc)
            end
            if len > UInt64.new(limit - pos) then
                return malformed(trunc)
            end
            local n = len:tonumber()
            if n > 0 then
                ft:add(f.close_reason, tvb(pos, n))
            end
            if not is_utf8(tvb, pos, n) then
                return malformed("BadReason: the close reason is not UTF-8")
            end
            pos = pos + n
            summary[#summary + 1] = "CLOSE(" .. tostring(code) .. ")"
        elseif ty == FR_PATH_CHALLENGE or ty == FR_PATH_RESPONSE then
            -- 8 bytes of data (docs/wire.md §14).
            if limit - pos < 8 then
                return malformed(trunc)
            end
            ft:add(f.path_data, tvb(pos, 8))
            summary[#summary + 1] = name .. "(" .. tostring(tvb(pos, 8):bytes()) .. ")"
            pos = pos + 8
        elseif ty == FR_MOVE_REQUEST or ty == FR_MOVE_REFUSED then
            -- One locator: the agent the client names (docs/wire.md §15); a refusal adds its
            -- reason.
            if pos >= limit then
                return malformed("BadLocator: " .. trunc)
            end
            local text, n, why = locator_text(tvb, pos, limit)
            if not text then
                return malformed("BadLocator: " .. why)
            end
            ft:add(f.move_to, tvb(pos, n), text)
            pos = pos + n
            if ty == FR_MOVE_REFUSED then
                if pos >= limit then
                    return malformed(trunc)
                end
                local code = tvb(pos, 1):uint()
                if not MOVE_REFUSALS[code] then
                    return malformed("BadRefusal: unknown MOVE_REFUSED reason " .. code)
                end
                ft:add(f.move_refusal, tvb(pos, 1))
                pos = pos + 1
                summary[#summary + 1] = "MOVE_REFUSED(" .. text .. "," .. MOVE_REFUSALS[code] .. ")"
            else
                summary[#summary + 1] = "MOVE_REQUEST(" .. text .. ")"
            end
        end
        ft:set_len(pos - start)
    end
    return table.concat(summary, " ")
end

-- Protocol 2: a flags byte (0, or 1 when the sender's serviceID follows), then the data. A
-- datagram travels by name, so it needs SERVICE and SOURCE (`info` says which were present);
-- receivers drop one without them or with other flags.
local function render_datagram(tvb, off, limit, tree, info)
    local t = tree:add(f.datagram, tvb(off, limit - off))
    if not (info.service and info.source) then
        t:add_proto_expert_info(e.dgram_malformed,
            "a datagram without SERVICE and SOURCE extensions is dropped")
    end
    if off >= limit then
        t:add_proto_expert_info(e.dgram_malformed, "Truncated: no flags byte")
        return
    end
    local flags = tvb(off, 1):uint()
    t:add(f.dgram_flags, tvb(off, 1))
    t:add(f.dgram_has_service, tvb(off, 1))
    local pos = off + 1
    if flags > 1 then
        t:add_tvb_expert_info(e.dgram_malformed, tvb(off, 1),
            string.format("flags 0x%02x: receivers take only 0 or 1 and drop the datagram", flags))
        return
    end
    if flags == 1 then
        if pos + 32 > limit then
            t:add_tvb_expert_info(e.dgram_malformed, tvb(off, limit - off),
                "Truncated: the sender's serviceID is cut short")
            return
        end
        t:add(f.dgram_service_id, tvb(pos, 32))
        pos = pos + 32
    end
    if pos < limit then
        t:add(f.dgram_data, tvb(pos, limit - pos))
    end
end

local function prefix_host_bits_clear(tvb, off, plen)
    for i = 0, 31 do
        local covered = plen - 8 * i
        if covered < 8 then
            local b = tvb(off + i, 1):uint()
            local keep = covered > 0 and covered or 0
            if b % (2 ^ (8 - keep)) ~= 0 then
                return false
            end
        end
    end
    return true
end

-- Protocol 3: a registration message of 60, 76 (with a cookie) or 140 bytes (and a signature).
-- Returns a summary, or nil if malformed.
local function render_registration(tvb, off, limit, tree)
    local t = tree:add(f.registration, tvb(off, limit - off))
    local function bad(msg, o, n)
        if n and n > 0 then
            t:add_tvb_expert_info(e.reg_malformed, tvb(o, n), msg)
        else
            t:add_proto_expert_info(e.reg_malformed, msg)
        end
        return nil
    end
    if not (u64_is_zero(tvb, 4) and u64_is_zero(tvb, 12)) then
        return bad("FlowNotZero: registration message with a non-zero flowID", 4, 16)
    end
    local n = limit - off
    if n ~= REG_PAYLOAD_LEN and n ~= REG_COOKIE_PAYLOAD_LEN and n ~= REG_SIGNED_PAYLOAD_LEN then
        return bad("BadLength: payload of " .. n .. " bytes, expected 60, 76 or 140", off, n)
    end
    local ty = tvb(off, 1):uint()
    local reason = tvb(off + 1, 1):uint()
    local plen = tvb(off + 2, 2):uint()
    t:add(f.reg_type, tvb(off, 1))
    t:add(f.reg_reason, tvb(off + 1, 1))
    t:add(f.reg_prefix_len, tvb(off + 2, 2))
    t:add(f.reg_request_id, tvb(off + 4, 4))
    t:add(f.reg_instance, tvb(off + 8, 8))
    t:add(f.reg_weight, tvb(off + 16, 4))
    t:add(f.reg_priority, tvb(off + 20, 4))
    t:add(f.reg_ttl, tvb(off + 24, 4))
    t:add(f.reg_prefix_id, tvb(off + 28, 32))
    local prefix = hex(tvb, off + 28, 32) .. "/" .. plen
    t:add(f.reg_prefix, tvb(off + 28, 32), prefix):set_generated()
    if n >= REG_COOKIE_PAYLOAD_LEN then
        t:add(f.reg_cookie, tvb(off + 60, 16))
    end
    if n >= REG_SIGNED_PAYLOAD_LEN then
        t:add(f.reg_signature, tvb(off + 76, 64))
    end
    if REG_TYPES[ty] == nil or (ty == 5 and n == REG_PAYLOAD_LEN) then
        return bad("UnknownType: registration type " .. ty, off, 1)
    end
    if (ty == 4) ~= (reason ~= 0) then
        return bad("BadReason: reason " .. reason .. " in a " .. REG_TYPES[ty], off + 1, 1)
    end
    if plen > 256 then
        return bad("BadPrefixLen: prefix length " .. plen .. " is beyond 256", off + 2, 2)
    end
    if not prefix_host_bits_clear(tvb, off + 28, plen) then
        return bad("PrefixHostBits: bits set past the prefix length", off + 28, 32)
    end
    if tvb(off + 16, 4):uint() == 0 then
        return bad("ZeroWeight: weight 0", off + 16, 4)
    end
    local s = REG_TYPES[ty]
    if ty == 4 then
        s = s .. " (" .. (REJECT_REASONS[reason] or ("reason " .. reason)) .. ")"
    end
    s = s .. " " .. prefix .. " req=" .. string.format("%08x", tvb(off + 4, 4):uint())
    if ty == 1 or ty == 3 then
        s = s .. " ttl=" .. tvb(off + 24, 4):uint() .. "ms"
    end
    if n == REG_SIGNED_PAYLOAD_LEN and (ty == 1 or ty == 2) then
        s = s .. " signed"
    end
    return s
end

-- Packet protection -------------------------------------------------------------------------------

-- What the SYN-ACKs of the capture said about their flows: for each direction of a flow, keyed
-- "source flowID>destination flowID" (both directions are entered), a list of
-- { at = position in the capture, plaintext = granted?, frame = frame number }. Entries are
-- added only on the first, in-order pass over the capture (pinfo.visited false); a packet uses
-- the latest entry at or before its own position, so a later re-dissection, in any order,
-- decides as the first pass did. Reset for every capture file (serval.init).
local flow_modes = {}

function serval.init()
    flow_modes = {}
end

local function flow_key(tvb, reverse)
    local src = tvb(4, 8):uint64():tohex()
    local dst = tvb(12, 8):uint64():tohex()
    if reverse then
        return dst .. ">" .. src
    end
    return src .. ">" .. dst
end

-- The position of a packet in the capture: its frame number, then its index in a GSO batch.
local function position(pinfo, gso)
    return pinfo.number * 4096 + (gso and gso.index or 0)
end

local function record_syn_ack(tvb, pinfo, at, plaintext)
    if pinfo.visited then
        return
    end
    for _, reverse in ipairs({ false, true }) do
        local key = flow_key(tvb, reverse)
        local list = flow_modes[key]
        if not list then
            list = {}
            flow_modes[key] = list
        end
        local known = false
        for _, m in ipairs(list) do
            known = known or m.at == at
        end
        if not known then
            list[#list + 1] = { at = at, plaintext = plaintext, frame = pinfo.number }
        end
    end
end

-- The latest SYN-ACK decision for this packet's flow at or before `at`, or nil.
local function flow_mode(tvb, at)
    local best
    for _, m in ipairs(flow_modes[flow_key(tvb, false)] or {}) do
        if m.at <= at and (not best or m.at > best.at) then
            best = m
        end
    end
    return best
end

-- Whether a packet is protected (wire.md §12): every packet of a flow after the SYN, which is
-- every packet with a destination flowID, except a NACK (a router holds no flow keys).
local function is_protected(tvb, info)
    if u64_is_zero(tvb, 12) then
        return false
    end
    return not (info.ctl_bits and math.floor(info.ctl_bits / 8) % 2 == 1)
end

-- The payload of protocol `protocol` from `off` to `limit`, in clear. Returns a summary or nil.
local function render_payload(tvb, h, off, limit, root, info, with_pn)
    if h.protocol == 1 and off < limit then
        return render_stream(tvb, off, limit, root, with_pn)
    elseif h.protocol == 2 then
        render_datagram(tvb, off, limit, root, info)
    elseif h.protocol == 3 then
        return render_registration(tvb, off, limit, root) or "(malformed registration)"
    elseif off < limit then
        root:add(f.payload, tvb(off, limit - off))
    end
    return nil
end

-- A protected packet: packet number, payload (encrypted, or frames in a plaintext flow), tag.
-- Returns a summary.
local function render_protected(tvb, pinfo, h, root, info, at)
    local off, cap, rep = h.hdr_len, h.cap, h.rep
    local body = off + PN_LEN
    local tag_off = rep - TAG_LEN
    if tag_off < body then
        local msg = "TooShort: " .. (rep - off) .. " bytes after the header; a protected packet " ..
            "needs at least 24 (packet number and tag), so the receiver drops it"
        if off < cap then
            root:add_tvb_expert_info(e.protect_malformed, tvb(off, cap - off), msg)
            root:add(f.payload, tvb(off, cap - off))
        else
            root:add_proto_expert_info(e.protect_malformed, msg)
        end
        return "(too short for packet protection)"
    end
    if cap < body then
        return "(packet number not captured)"
    end
    local control = info.ctl_bits ~= nil
    root:add(f.pn, tvb(off, PN_LEN))
    root:add(f.pn_space, tvb(off, PN_LEN), control and "control" or "data"):set_generated()
    local summary = { "pn=" .. tostring(tvb(off, PN_LEN):uint64()) }
    if tvb(0, 1):uint() % 2 == 1 then
        summary[#summary + 1] = "kp=1"
    end
    local mode = flow_mode(tvb, at)
    local plaintext
    if mode then
        plaintext = mode.plaintext
        root:add(f.flow_plaintext, tvb(0, 0), plaintext):set_generated()
        root:add(f.flow_synack, tvb(0, 0), mode.frame):set_generated()
    else
        plaintext = serval.prefs.assume_plaintext
        local item = root:add(f.flow_plaintext, tvb(0, 0), plaintext)
        item:set_generated()
        item:append_text(" (assumed: the flow's SYN-ACK is not in the capture)")
    end
    local body_end = math.min(tag_off, cap)
    if body < body_end then
        if plaintext then
            summary[#summary + 1] = render_payload(tvb, h, body, body_end, root, info, false)
        else
            root:add(f.encrypted, tvb(body, body_end - body))
            summary[#summary + 1] = "encrypted(" .. (tag_off - body) .. ")"
        end
    end
    if cap >= rep then
        root:add(f.tag, tvb(tag_off, TAG_LEN))
    end
    return table.concat(summary, " ")
end

-- The dissector -----------------------------------------------------------------------------------

-- Dissects one SAL packet (the whole of `tvb`) under `tree`; returns the text for the Info column.
-- `gso` = {index, count, size} for a segment of a GSO batch.
local function dissect_packet(tvb, pinfo, tree, gso)
    local h = parse_header(tvb)
    local root = tree:add(serval, tvb())
    if gso then
        root:append_text(" (GSO segment " .. gso.index .. " of " .. gso.count .. ")")
        root:add(f.gso_segment, tvb(0, 0), gso.index):set_generated()
        root:add(f.gso_segments, tvb(0, 0), gso.count):set_generated()
        root:add(f.gso_segment_size, tvb(0, 0), gso.size):set_generated()
    end
    if not h.base then
        -- Not even a base header: show the reason.
        add_error(root, h.err.snapped and e.snapped or e.malformed, tvb, h.err)
        return "Malformed SAL packet: " .. h.err.msg
    end
    root:add(f.version, tvb(0, 1))
    root:add(f.key_phase, tvb(0, 1))
    root:add(f.reserved, tvb(0, 1))
    root:add(f.protocol, tvb(1, 1))
    root:add(f.hdr_len, tvb(2, 2))
    root:add(f.src_flowid, tvb(4, 8))
    root:add(f.dst_flowid, tvb(12, 8))
    local info = {}
    for _, x in ipairs(h.exts) do
        render_ext(tvb, root, x, info)
    end
    local text = {}
    if info.flags and info.flags ~= "" then
        text[#text + 1] = "[" .. info.flags .. "]"
    end
    text[#text + 1] = PROTOCOLS[h.protocol] or ("protocol-" .. h.protocol)
    text[#text + 1] = tvb(4, 8):uint64():tohex():lower() .. " → " .. tvb(12, 8):uint64():tohex():lower()
    if info.service then
        text[#text + 1] = "service=" .. info.service
    end
    if info.source then
        text[#text + 1] = "source=" .. table.concat(info.source, ",")
    end
    if info.cookie then
        text[#text + 1] = "cookie"
    end
    if info.keyshare_plaintext then
        text[#text + 1] = "plaintext"
    end
    root:append_text(", " .. table.concat(text, " "))
    if h.err then
        if h.err.snapped then
            add_error(root, e.snapped, tvb, h.err)
        else
            add_error(root, e.malformed, tvb, h.err)
            text[#text + 1] = "(malformed: " .. h.err.msg .. ")"
        end
        return table.concat(text, " ")
    end
    local off, limit = h.hdr_len, h.cap
    if h.cap < h.rep then
        root:add_proto_expert_info(e.snapped, "only " .. h.cap .. " of " .. h.rep ..
            " bytes captured: the payload is cut short")
    end
    local at = position(pinfo, gso)
    -- A SYN-ACK says whether its flow runs in plaintext; its own payload (if any) follows it.
    if info.ctl_bits and info.ctl_bits % 4 == 3 and info.keyshare_plaintext ~= nil then
        record_syn_ack(tvb, pinfo, at, info.keyshare_plaintext)
    end
    if is_protected(tvb, info) then
        text[#text + 1] = render_protected(tvb, pinfo, h, root, info, at)
    else
        text[#text + 1] = render_payload(tvb, h, off, limit, root, info, true)
    end
    return table.concat(text, " ")
end

-- A capture taken on the sending host (loopback included) sees a UDP GSO batch before the kernel
-- cuts it into datagrams: one "datagram" holding several SAL packets of one segment size back to
-- back, the last one possibly shorter. The packets of a batch belong to one flow, so each segment
-- starts with a version-1 byte and the same 16 bytes of flowIDs (its protocol and header length
-- may differ: a control packet and a stream packet can share a batch). Nothing after the base
-- header is assumed: a segment ends with its tag (wire.md §12), whose bytes, like an encrypted
-- payload's, are arbitrary. Returns the segment size if `tvb` is such a batch (two segments or
-- more), else nil.
local function gso_segment_size(tvb)
    local len = tvb:len()
    if len < 2 * BASE_LEN or len ~= tvb:reported_length_remaining()
            or (u64_is_zero(tvb, 4) and u64_is_zero(tvb, 12)) then
        return nil
    end
    local raw = tvb:raw(0, len)
    local flows = raw:sub(5, BASE_LEN)
    local first = math.max(tvb(2, 2):uint(), BASE_LEN)
    local function starts_packet(k)
        return len - k >= BASE_LEN and math.floor(raw:byte(k + 1) / 16) == VERSION
            and raw:sub(k + 5, k + BASE_LEN) == flows
    end
    -- string.find counts from 1: flowIDs found at position m belong to a header at offset m - 5.
    local from = first + 5
    for _ = 1, 64 do
        local m = raw:find(flows, from, true)
        if not m then
            return nil
        end
        local size = m - 5
        local ok = starts_packet(size)
        for k = 2 * size, len - 1, size do
            ok = ok and starts_packet(k)
        end
        if ok then
            return size
        end
        from = m + 1
    end
    return nil
end

local function dissect(tvb, pinfo, tree)
    pinfo.cols.protocol = "Serval"
    local size = gso_segment_size(tvb)
    if not size then
        pinfo.cols.info = dissect_packet(tvb, pinfo, tree)
        return
    end
    local len = tvb:len()
    local n = math.floor((len + size - 1) / size)
    local texts = {}
    for i = 0, n - 1 do
        local seg = tvb(i * size, math.min(size, len - i * size)):tvb()
        texts[#texts + 1] = dissect_packet(seg, pinfo, tree, { index = i + 1, count = n, size = size })
    end
    pinfo.cols.info = "GSO batch of " .. n .. ": " .. table.concat(texts, " | ")
end

-- Never lets a Lua error escape: anything unexpected becomes an expert-info error.
local function dissect_safely(tvb, pinfo, tree)
    local ok, err = pcall(dissect, tvb, pinfo, tree)
    if not ok then
        tree:add_proto_expert_info(e.internal, "Serval dissector error: " .. tostring(err))
    end
    return tvb:len()
end

serval.dissector = dissect_safely

-- Claims a UDP datagram only if its whole SAL header validates (version 1, a header length
-- within the packet, well-formed extensions in a legal order) and its protocol is one this
-- version defines; a registration must also have zero flowIDs and a payload of 60, 76 or 140
-- bytes.
local function heuristic(tvb, pinfo, tree)
    local ok, claimed = pcall(function()
        if tvb:len() < BASE_LEN or tvb:len() ~= tvb:reported_length_remaining() then
            return false
        end
        local h = parse_header(tvb)
        if h.err or not PROTOCOLS[h.protocol] then
            return false
        end
        if h.protocol == 3 then
            local n = h.cap - h.hdr_len
            if (n ~= REG_PAYLOAD_LEN and n ~= REG_COOKIE_PAYLOAD_LEN and n ~= REG_SIGNED_PAYLOAD_LEN)
                    or not u64_is_zero(tvb, 4) or not u64_is_zero(tvb, 12) then
                return false
            end
        end
        return true
    end)
    if not (ok and claimed) then
        return false
    end
    dissect_safely(tvb, pinfo, tree)
    return true
end

local udp_port = DissectorTable.get("udp.port")
udp_port:add(DEFAULT_PORT, serval)
udp_port:add(DISCOVERY_PORT, serval)
serval:register_heuristic("udp", heuristic)
