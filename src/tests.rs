use pgrx::prelude::*;

#[pg_test]
fn smoke() {
    assert!(Spi::get_one::<bool>("SELECT true").unwrap().unwrap());
}
