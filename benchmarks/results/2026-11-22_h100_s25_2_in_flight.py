import numpy as np, sys
for tag in sys.argv[1:]:
    t = np.load(f"{tag}.npz")["trace"]
    t0 = t[:, 0].min(); rel = t[:, 0] - t0
    m = (rel > 2.5) & (rel < rel.max() - 0.5)
    arr, dis, col = t[:,0], t[:,1], t[:,2]
    # batches in flight at each event's arrival (distinct dispatch times)
    bd = np.unique(np.stack([dis, col], 1), axis=0)
    infl = np.array([((bd[:,0] < a) & (bd[:,1] > a)).sum() for a in arr[m]])
    wait = 1e3*(dis-arr)[m]
    for k in range(4):
        sel = infl == k
        if sel.any():
            print(f"{tag}: in flight at arrival {k}: share {sel.mean():.3f} wait p50 {np.median(wait[sel]):.3f} p90 {np.percentile(wait[sel],90):.3f} server p99 {np.percentile(1e3*(t[m][sel,3]-t[m][sel,0]),99):.2f}")
