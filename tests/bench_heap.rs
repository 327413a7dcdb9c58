//! The heap cost per PASID that `vsva bench` reports, checked alone in its process (other
//! test threads would allocate meanwhile): filling a tenth of the space costs the
//! allocator's maps some tens of bytes per PASID, as the host crate's counting-allocator
//! test finds.

use vsva::bench::pasid::PasidChurn;

#[test]
fn heap_per_pasid_is_the_allocators_cost() {
    let c = PasidChurn::new(0.1).unwrap();
    let per = c.heap_per_pasid().unwrap();
    assert!((16.0..=128.0).contains(&per), "{per} bytes per PASID");
}
