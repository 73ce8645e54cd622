import numpy as np, sys, json
for tag in sys.argv[1:]:
    t = np.load(f"{tag}.npz")["trace"]
    t0 = t[:, 0].min(); rel = t[:, 0] - t0
    m = (rel > 2.5) & (rel < rel.max() - 0.5)
    u = t[m]
    srv = 1e3*(u[:,3]-u[:,0]); wait=1e3*(u[:,1]-u[:,0]); trip=1e3*(u[:,2]-u[:,1]); eng=1e3*u[:,4]; post=1e3*(u[:,3]-u[:,2])
    slow = srv > np.percentile(srv, 99)
    print(f"{tag}: n {len(u)} server p50/99/99.9 {np.percentile(srv,[50,99,99.9]).round(2)}  >2ms {(srv>2).mean():.4f}")
    for name, v in [("wait", wait), ("trip", trip), ("engine", eng), ("trip-eng", trip-eng), ("post", post), ("batch events", u[:,7])]:
        print(f"   {name:12s} p50 {np.median(v):.3f} p99 {np.percentile(v,99):.3f}  mean in top1% {v[slow].mean():.3f}")
    j = json.load(open(f"{tag}.json"))["batched"]
    print("   p99 by second:", [round(x,1) for x in j["latency_p99_ms_by_second"]])
