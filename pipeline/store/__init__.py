"""The Zarr v3 output: its provenance record (format), its nodes and block writes (layout), its lease (lease).

    create(path, plan, mode, o, dtype, prov, overwrite=False)    # the group, kernel, markers and record
    BlockWriter(path).write(block, values)                        # a block, then its marker
    update_provenance(path, prov.model_copy(update={"status": "complete"}))

Reading a store is ``pipeline.kernel.open_kernel``'s job; this package writes it and says what is there.
"""

from __future__ import annotations

from pipeline.store.format import (
    ATTRIBUTE,
    FORMAT_VERSION,
    BlockSizing,
    FeatureProbe,
    FeatureRecord,
    Function,
    Provenance,
    Strip,
    parse,
    read_provenance,
)
from pipeline.store.layout import (
    COMPRESSORS,
    CONNECT_TIMEOUT_S,
    DIMENSIONS,
    DONE,
    FEATURES,
    KERNEL,
    LEASE,
    BlockWriter,
    check_output,
    clear,
    create,
    done_mask,
    existing,
    open_group,
    reach,
    transpose,
    transposed_copy,
    unmark,
    update_provenance,
)
from pipeline.store.lease import (
    STOPPED,
    Lease,
    LeaseRecord,
    describe_lease,
    lease_alive,
    lease_holder,
    parse_lease,
    run_status,
)

__all__ = [
    "ATTRIBUTE", "COMPRESSORS", "CONNECT_TIMEOUT_S", "DIMENSIONS", "DONE", "FEATURES", "FORMAT_VERSION", "KERNEL",
    "LEASE", "STOPPED", "BlockSizing", "BlockWriter", "FeatureProbe", "FeatureRecord", "Function", "Lease",
    "LeaseRecord", "Provenance", "Strip", "check_output", "clear",
    "create", "describe_lease", "done_mask", "existing", "lease_alive", "lease_holder", "open_group", "parse",
    "parse_lease",
    "reach", "read_provenance", "run_status", "transpose", "transposed_copy", "unmark", "update_provenance",
]
