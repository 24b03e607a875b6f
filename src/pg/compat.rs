//! What differs between the PostgreSQL major versions keyhippo supports (14 to 18), in one
//! place. Everything else calls pgrx's bindings, which are generated for the version built
//! against; a function whose signature changed between versions is called through here.

use pgrx::pg_sys;

/// `index_beginscan` (access/genam.h). PostgreSQL 18 added an instrumentation argument, NULL
/// when the caller does not collect index scan statistics.
///
/// # Safety
/// As `index_beginscan`: open relations, a registered or active snapshot.
pub unsafe fn index_beginscan(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    nkeys: i32,
    norderbys: i32,
) -> pg_sys::IndexScanDesc {
    // SAFETY: the caller's obligations are the function's (see above).
    #[cfg(feature = "pg18")]
    unsafe {
        pg_sys::index_beginscan(
            heap,
            index,
            snapshot,
            std::ptr::null_mut(),
            nkeys,
            norderbys,
        )
    }
    // SAFETY: as above.
    #[cfg(not(feature = "pg18"))]
    unsafe {
        pg_sys::index_beginscan(heap, index, snapshot, nkeys, norderbys)
    }
}

/// Attribute `i` (from 0) of a tuple descriptor: `TupleDescAttr`, a field access up to 17 and an
/// inline function over a different layout from 18 on (pgrx's `PgTupleDesc` knows both).
///
/// # Safety
/// `desc` a valid tuple descriptor with more than `i` attributes, outliving the result.
pub unsafe fn attr<'a>(desc: pg_sys::TupleDesc, i: usize) -> &'a pg_sys::FormData_pg_attribute {
    unsafe {
        let desc = pgrx::PgTupleDesc::from_pg_unchecked(desc);
        let attr: *const pg_sys::FormData_pg_attribute = desc.get(i).expect("attribute in range");
        &*attr
    }
}

/// Runs `request` (calls to `RequestAddinShmemSpace` / `RequestNamedLWLockTranche`) where the
/// running version allows it: in `shmem_request_hook` from 15 on, in `_PG_init` on 14. Called
/// from `_PG_init` while preloading.
pub fn request_shmem(request: fn()) {
    #[cfg(feature = "pg14")]
    request();
    #[cfg(not(feature = "pg14"))]
    // SAFETY: library load in the postmaster, single-threaded: the hook chains the one
    // installed before.
    unsafe {
        static mut PREV: pg_sys::shmem_request_hook_type = None;
        static mut REQUEST: Option<fn()> = None;
        #[pgrx::pg_guard]
        unsafe extern "C-unwind" fn on_request() {
            unsafe {
                if let Some(prev) = PREV {
                    prev();
                }
                if let Some(request) = REQUEST {
                    request();
                }
            }
        }
        REQUEST = Some(request);
        PREV = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_request);
    }
}

/// `AddinShmemInitLock` (a macro over the main LWLock array, which bindgen cannot translate),
/// the lock every extension takes around `ShmemInitStruct`; pgrx's own shared memory takes the
/// same entry on every version.
///
/// # Safety
/// In a process attached to shared memory.
pub unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    unsafe { &raw mut (*pg_sys::MainLWLockArray.add(21)).lock }
}

/// This backend's local transaction id: a number no other transaction of this backend had.
/// (PostgreSQL 17 moved it into `PGPROC.vxid`.)
pub fn local_transaction_id() -> u32 {
    // SAFETY: MyProc is this process's PGPROC, in shared memory for the life of the server;
    // only this backend writes its local transaction id.
    unsafe {
        #[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16"))]
        {
            (*pg_sys::MyProc).lxid
        }
        #[cfg(not(any(feature = "pg14", feature = "pg15", feature = "pg16")))]
        {
            (*pg_sys::MyProc).vxid.lxid
        }
    }
}
