//! Any bytes as a client text frame: parsing never panics, a frame it accepts keeps the
//! protocol's promises, and a refusal always encodes to a JSON `ERROR` frame.
#![no_main]

use chatd::protocol::{is_valid_user_id, parse_client_frame, ClientFrame, ParseContext, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Text frames are UTF-8 by the time they reach the parser (the WebSocket layer refuses the
    // rest with 1007); lossy conversion still lets the fuzzer reach every parser branch.
    let text = String::from_utf8_lossy(data);
    let ctx = ParseContext { user_id: "alice", max_content_chars: 64 };
    match parse_client_frame(&text, ctx) {
        Ok(ClientFrame::Chat(send)) => {
            assert!(is_valid_user_id(&send.receiver_id));
            assert!(!send.content.trim().is_empty());
            assert!(send.content.chars().count() <= 64);
            assert!(!send.chat_id.is_empty() && send.chat_id.chars().count() <= 128);
        }
        Ok(ClientFrame::Typing { receiver_id, .. }) => assert!(is_valid_user_id(&receiver_id)),
        Ok(_) => {}
        Err(e) => {
            let json = ServerFrame::from(&e).encode();
            let v: serde_json::Value = serde_json::from_str(&json).expect("ERROR frames are JSON");
            assert_eq!(v["type"], "ERROR");
        }
    }
});
