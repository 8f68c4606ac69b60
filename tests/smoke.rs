//! The quickest end-to-end check: a real client through stormwall to a real Redis.

mod common;

use common::{Redis, Stormwall, assert_same};
use redis::Commands;

#[test]
fn get_set_through_the_proxy() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut c = sw.client();
    let _: () = c.set("greeting", "hello").unwrap();
    let v: String = c.get("greeting").unwrap();
    assert_eq!(v, "hello");
    // And Redis really has it.
    let direct: String = redis.client().get("greeting").unwrap();
    assert_eq!(direct, "hello");
}

#[test]
fn replies_are_byte_identical_to_direct() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    assert_same(
        &redis,
        &sw,
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*1\r\n$7\r\nNOSUCHC\r\n",
        4,
    );
}
