"""Client: typed Python calls for every BlockService RPC.

    with blockd.Client("localhost:50051", token="s3cret", timeout=30) as c:
        c.create_block("layer0", BlockConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128),
                       seed=1)
        out, act = c.forward(["layer0"], x, keep_activations=True)   # x: np.ndarray or torch.Tensor
        dx = c.backward(act, dy)
        c.step(["layer0"], lr=1e-3)
        weights = c.download_tensors("layer0")                       # {name: np.ndarray}

Tensors go in as numpy arrays or torch tensors and come back as the same kind; float32 by
default on the wire, bfloat16 with dtype="bf16". Failed calls raise a `BlockdError` subclass that
carries the gRPC code and the server's message. `timeout` (seconds) is every call's deadline unless
a call passes its own.
"""
import collections
import math
import queue
import threading
import weakref

import grpc

from blockd import tensors as T
from blockd.config import BlockConfig, LoraConfig, kind_value, precision_value
from blockd.errors import (BlockdError, DeadlineExceededError, FailedPreconditionError, NotFoundError,
                           ResourceExhaustedError, UnavailableError, from_rpc_error)
from blockd.cuda_ipc import CudaArenas, share_cuda_tensor
from blockd.malloc_tuning import tune_malloc_for_large_buffers
from blockd.shared_memory import TRANSPORTS, RegionPool, SharedMemoryRegion
from blockd.v1 import block_service_pb2 as pb
from blockd.v1 import block_service_pb2_grpc as pb_grpc

DEFAULT_CHUNK_BYTES = 1 << 20  # the server accepts chunks up to ServerLimits.max_chunk_bytes (4 MiB)

ForwardResult = collections.namedtuple("ForwardResult", ["output", "activation_id"])
StepResult = collections.namedtuple("StepResult", ["grad_norm", "skipped", "clip_coefficient", "steps"])
InferStepResult = collections.namedtuple("InferStepResult", ["hidden_states", "length", "step_id"])
GradNormResult = collections.namedtuple("GradNormResult", ["sum_of_squares", "finite"])


def _read_pem(v):
    if v is None or isinstance(v, bytes):
        return v
    with open(v, "rb") as f:
        return f.read()


def _size_text(n):
    """"300.0 MiB", "256 MiB": whole units print without a fraction, as the C++ client writes them."""
    units, unit, scale = ("bytes", "KiB", "MiB", "GiB"), 0, 1
    while unit < 3 and n >= scale * 1024:
        scale *= 1024
        unit += 1
    return f"{n // scale} {units[unit]}" if n % scale == 0 else f"{n / scale:.1f} {units[unit]}"


def _tensor_text(t):
    return f"[{','.join(str(d) for d in t.shape)}] {T.dtype_name(t.dtype)}"


def _release_loop(q, stub, metadata):
    """Frees activation handles that were dropped without a backward (see Client.release_later)."""
    while True:
        item = q.get()
        if item is None:
            return
        if isinstance(item, threading.Event):
            item.set()
            continue
        try:
            stub.ReleaseActivations(pb.ReleaseActivationsRequest(activation_id=item), timeout=10,
                                    metadata=metadata)
        except grpc.RpcError:
            pass  # already consumed, expired, or the server is gone: nothing left to free


class Client:
    def __init__(self, target, token=None, tls=False, root_certificates=None, certificate_chain=None,
                 private_key=None, timeout=None, chunk_bytes=DEFAULT_CHUNK_BYTES,
                 max_message_bytes=256 << 20, client_name=None, channel_options=(), transport="auto"):
        """target "host:port"; token: bearer token (--auth_token_file); tls: True, or a
        grpc.ChannelCredentials; root_certificates / certificate_chain / private_key: PEM bytes or
        file paths (mutual TLS); timeout: default deadline in seconds (None: none);
        client_name: how the server accounts this client's activation handles.
        transport: how Forward/Backward/InferStep tensors travel: "auto" (shared memory when the
        daemon is on this host and allows it, else inside the messages), "grpc" (always inside the
        messages), "shared_memory" (raise rather than fall back) or "cuda_ipc" (CUDA tensors through
        CUDA IPC, raising rather than falling back). "auto" takes CUDA IPC for CUDA tensors when the
        daemon opens the client's device memory (same host and GPU), else shared memory."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport = {transport!r}, expected one of {TRANSPORTS}")
        tune_malloc_for_large_buffers()  # activations of tens of MB: blockd.malloc_tuning
        self.transport = transport
        self._arena = None  # shared-memory RegionPool once it works; False once "auto" found it cannot
        self._arena_lock = threading.Lock()
        self._cuda = CudaArenas(self)  # CUDA IPC regions by device (blockd.cuda_ipc)
        self.target = target
        self.timeout = timeout
        self.chunk_bytes = int(chunk_bytes)
        self.max_message_bytes = int(max_message_bytes)
        # Activations are tens of MB: large HTTP/2 frames and a deep per-stream window.
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.http2.max_frame_size", (1 << 24) - 1),
                   ("grpc.http2.lookahead_bytes", 64 << 20)] + list(channel_options)
        if isinstance(tls, grpc.ChannelCredentials):
            self._channel = grpc.secure_channel(target, tls, options=options)
        elif tls or root_certificates or certificate_chain:
            creds = grpc.ssl_channel_credentials(_read_pem(root_certificates), _read_pem(private_key),
                                                 _read_pem(certificate_chain))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.BlockServiceStub(self._channel)
        md = []
        if token:
            md.append(("authorization", f"Bearer {token}"))
        if client_name:
            md.append(("blockd-client", client_name))
        self._metadata = tuple(md)
        self._releases = queue.SimpleQueue()
        self._release_thread = threading.Thread(target=_release_loop, args=(self._releases, self._stub, self._metadata),
                                                name="blockd-release", daemon=True)
        self._release_thread.start()
        self._finalizer = weakref.finalize(self, self._releases.put, None)
        self._closed = False
        self._streams = weakref.WeakSet()  # open InferStreams, ended by close()

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self):
        """Frees dropped activation handles, then closes the channel."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams):
            stream.close()
        self._releases.put(None)
        self._release_thread.join(timeout=30)
        self._finalizer.detach()
        if self._arena:
            self._arena.close()  # unregisters the region (its TTL would otherwise)
        self._cuda.close()
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout=10.0):
        """Blocks until the channel is connected (or raises UnavailableError)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                   f"{self.target} was not ready within {timeout} s", "wait_ready") from None
        return self

    def release_later(self, activation_id):
        """Queues an activation handle to be freed by a background thread. Safe from __del__ and
        garbage-collector callbacks (it only enqueues)."""
        if not self._closed:
            self._releases.put(activation_id)

    def flush_releases(self, timeout=30.0):
        """Waits until every handle queued by release_later was freed."""
        if self._closed:
            return
        done = threading.Event()
        self._releases.put(done)
        done.wait(timeout)

    # -- plumbing ----------------------------------------------------------------------------
    def _deadline(self, timeout):
        return self.timeout if timeout is None else timeout

    def _unary(self, method, request, timeout):
        try:
            return getattr(self._stub, method)(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None

    def _arena_for(self, transport):
        """The shared-memory arena for an activation call, or None for inline tensors."""
        mode = transport or self.transport
        if mode not in TRANSPORTS:
            raise ValueError(f"transport = {mode!r}, expected one of {TRANSPORTS}")
        if mode == "cuda_ipc":  # reached for host tensors, and for InferStep (CUDA IPC serves Forward/Backward)
            raise ValueError("transport 'cuda_ipc' takes CUDA torch tensors to Forward and Backward")
        if mode == "grpc":
            return None
        with self._arena_lock:
            if self._arena is None or (self._arena is False and mode == "shared_memory"):
                pool = RegionPool(lambda size: SharedMemoryRegion(self, size))
                got = self._first_region(pool, mode == "shared_memory", (BlockdError, OSError))
                if got is None:
                    return None
                self._arena = got
            return self._arena or None

    def _activation_call(self, method, request, field, out_field, x, dtype, transport, timeout):
        """Forward/Backward/InferStep with host tensor x as the tensor `field` of `request`: through
        one of the client's shared-memory regions when the transport allows (x's wire bytes copied
        straight into it, the reply decoded straight out of it), else inside the messages
        (_sized_unary). Returns (response, the reply tensor `out_field` like x)."""
        wire, shape, array = T.encode_array(x, dtype)
        tensor = getattr(request, field)
        tensor.dtype = wire
        tensor.shape[:] = shape
        arena = self._arena_for(transport)
        if arena is None:
            tensor.data = array.tobytes()
            resp = self._sized_unary(method, request, field, tensor, timeout)
            return resp, T.from_proto(getattr(resp, out_field), like=x)
        with arena.lease(array.nbytes) as lease:
            for attempt in (0, 1):
                region = lease.region
                ref = region.ref(0, array.nbytes)
                region.write(0, array)
                tensor.shared_memory.CopyFrom(ref)
                request.output_shared_memory.CopyFrom(ref)  # in place: the server reads all before writing
                try:
                    resp = self._unary(method, request, timeout)
                    break
                except NotFoundError as e:
                    # Unused past the daemon's --shared_memory_ttl, the region was unregistered:
                    # register a new one and send again (nothing ran: the region is checked first).
                    if attempt or "shared-memory region" not in e.details:
                        raise
                    lease.renew()
            out = getattr(resp, out_field)
            if not out.HasField("shared_memory"):
                return resp, T.from_proto(out, like=x)
            return resp, T.decode(out.dtype, out.shape, region.read_array(out.shared_memory), like=x)

    def _cuda_pool_for(self, x, transport):
        """The CUDA IPC regions of x's device for an activation call with tensor x, or None for the
        other paths. The first call for a device asks the daemon and registers a region."""
        mode = transport or self.transport
        if mode not in TRANSPORTS:
            raise ValueError(f"transport = {mode!r}, expected one of {TRANSPORTS}")
        on_gpu = T.is_torch(x) and x.is_cuda
        if mode == "cuda_ipc" and not on_gpu:
            raise ValueError("transport 'cuda_ipc' takes CUDA torch tensors")
        if mode not in ("auto", "cuda_ipc") or not on_gpu:
            return None
        with self._cuda.lock:
            pool = self._cuda.pools.get(x.device.index)
            if pool is None or (pool is False and mode == "cuda_ipc"):
                got = self._first_region(self._cuda.pool(x.device), mode == "cuda_ipc",
                                         (BlockdError, RuntimeError, ValueError))
                if got is None:
                    return None
                self._cuda.pools[x.device.index] = pool = got
            return pool or None

    def _first_region(self, pool, forced, errors):
        """Asks whether the daemon allows shared memory and registers `pool`'s first region: the
        probe (a daemon on another host answers NOT_FOUND for a POSIX object; a CPU daemon, or one
        on another host or GPU, refuses CUDA IPC memory). Returns the pool; None when the daemon is
        not answering now (ask again next call); False when it cannot, for good. `forced` (the
        caller insists on this transport): raises instead of falling back."""
        try:
            if not self.server_info().shared_memory.allowed:
                raise FailedPreconditionError(
                    grpc.StatusCode.FAILED_PRECONDITION, "the daemon does not allow shared-memory tensors (--allow_shared_memory)")
            with pool.lease(1 << 20):
                pass
            return pool
        except errors as e:
            pool.close()
            if forced:
                raise
            return None if isinstance(e, (UnavailableError, DeadlineExceededError)) else False

    def _cuda_ipc_call(self, method, request, field, out_field, x, dtype, transport, timeout):
        """Forward/Backward with a CUDA tensor x through CUDA IPC when the transport allows: x goes
        into a region of its device (one per call in flight), the daemon reads it and writes the
        reply there (device to device). Returns (response, reply tensor), or None to take the other
        paths."""
        torch = T._torch()
        native = (torch.float32, torch.bfloat16, torch.float16)
        wire = T.wire_dtype(dtype if dtype is not None else x.dtype if x.dtype in native else "fp32")
        as_torch = {T.FLOAT32: torch.float32, T.BFLOAT16: torch.bfloat16, T.FLOAT16: torch.float16}[wire]
        nbytes = x.numel() * T.itemsize(wire)
        pool = self._cuda_pool_for(x, transport)
        if pool is None:
            return None
        if x.dtype == as_torch and x.is_contiguous():
            done = self._cuda_in_place(method, request, field, out_field, x, wire, timeout)
            if done is not None:
                return done
        with pool.lease(nbytes) as lease:
            region = lease.region
            region.put(x.detach().to(as_torch).contiguous())
            ref = region.ref(0, nbytes)
            getattr(request, field).CopyFrom(pb.Tensor(dtype=wire, shape=tuple(x.shape), shared_memory=ref))
            request.output_shared_memory.CopyFrom(ref)  # in place: the daemon reads all before writing
            resp = self._unary(method, request, timeout)
            out = getattr(resp, out_field)
            if not out.HasField("shared_memory"):
                raise ValueError(f"{method} answered inline bytes to a CUDA IPC request")
            return resp, region.take(as_torch, out.shape, like=x)

    def _cuda_in_place(self, method, request, field, out_field, x, wire, timeout):
        """_cuda_ipc_call for a contiguous x already in the wire dtype: the daemon reads x where it
        is and writes the reply into a new tensor where that is, both named in their caching
        allocator segments (CudaSegments). None when a segment cannot be named (the caller copies
        through a region instead)."""
        torch = T._torch()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        got = self._cuda.segments.refs([x, out])
        if got is None:
            return None
        (x_ref, out_ref), taken = got
        try:
            # The segments carry no event: x is written, and out's memory is done with by its earlier
            # users, once the stream's work so far has run.
            torch.cuda.current_stream(x.device).synchronize()
            getattr(request, field).CopyFrom(pb.Tensor(dtype=wire, shape=tuple(x.shape), shared_memory=x_ref))
            request.output_shared_memory.CopyFrom(out_ref)
            resp = self._unary(method, request, timeout)
        except NotFoundError as e:
            names = {x_ref.region, out_ref.region}
            if not any(n in e.details for n in names):
                raise
            self._cuda.segments.forget(names)  # expired by the daemon's TTL; nothing ran: copy instead
            return None
        finally:
            self._cuda.segments.release(taken)
        got = getattr(resp, out_field)
        if not got.HasField("shared_memory") or got.shared_memory != out_ref:
            raise ValueError(f"{method} answered another place than the request's output slice ({out_ref.region})")
        return resp, out

    def register_cuda_tensor(self, name, tensor, event=None, timeout=None):
        """Registers a contiguous CUDA tensor's memory as region `name` (CUDA IPC; the daemon must
        run on the same GPU with --allow_shared_memory). `event`: a torch.cuda.Event(interprocess=True)
        that the daemon waits on before each read or write of the region (record it before each call)."""
        device, handle, offset, size = share_cuda_tensor(tensor)
        req = pb.RegisterSharedMemoryRequest(name=name, cuda_ipc_handle=handle, device=device, byte_size=size,
                                             offset=offset,
                                             cuda_ipc_event_handle=bytes(event.ipc_handle()) if event is not None else b"")
        return self._unary("RegisterSharedMemory", req, timeout).region

    # -- shared memory (same host; see blockd.shared_memory) ----------------------------------
    def register_shared_memory(self, name, key, byte_size, offset=0, timeout=None):
        req = pb.RegisterSharedMemoryRequest(name=name, key=key, byte_size=byte_size, offset=offset)
        return self._unary("RegisterSharedMemory", req, timeout).region

    def unregister_shared_memory(self, name, timeout=None):
        self._unary("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=name), timeout)

    def list_shared_memory(self, timeout=None):
        return list(self._unary("ListSharedMemory", pb.ListSharedMemoryRequest(), timeout).regions)

    def _sized_unary(self, method, request, what, tensor, timeout):
        """_unary for a request that carries an activation tensor. gRPC refuses a message over a
        channel's limit with a bare "Sent message larger than max" (or, from the server, "Received
        message larger than max"); this says which limit, how large, and what to do, in the C++
        client's words."""
        size = request.ByteSize()
        head = f"{method} {what} {_tensor_text(tensor)} is {_size_text(size)}"
        if size > self.max_message_bytes:
            raise ResourceExhaustedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{head}, over the {_size_text(self.max_message_bytes)} message limit (--max_message_bytes on the "
                f"server / Client(max_message_bytes=...)): split the batch", method)
        try:
            return self._unary(method, request, timeout)
        except ResourceExhaustedError as e:
            if not e.details.startswith("Received message larger than max"):
                raise
            raise ResourceExhaustedError(e.code, f"{head}, over the server's message limit ({e.details}): split "
                                                 f"the batch, or raise --max_message_bytes on the server",
                                         method) from None

    # -- RPCs --------------------------------------------------------------------------------
    def server_info(self, timeout=None):
        """GetServerInfoResponse: version, backend, devices, limits, blocks, activations_held."""
        return self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout)

    def create_block(self, block_id, config, layer_index=0, seed=None, precision=None, device=0,
                     max_seq_len=0, max_batch_size=0, ttl=None, frozen=False, lora=None, timeout=None):
        """Creates a block; with `seed` its weights are a deterministic random init, without it
        they must be loaded (load_weights) before Forward. `frozen` keeps the weights only (in the
        compute dtype; no gradients or AdamW state): forward, backward's input gradient and sessions
        work, step and zero_grad are refused. `lora` (a LoraConfig or a dict of its fields) adds
        LoRA adapters, trained even on a frozen block (then step updates them only). `ttl`
        (seconds, >= 1) gives it a lease: the server deletes it once no call has named it for that
        long, so a client that dies leaves
        nothing behind. Returns its BlockInfo."""
        req = pb.CreateBlockRequest(block_id=block_id, config=BlockConfig.coerce(config).to_proto(),
                                    layer_index=layer_index, precision=precision_value(precision),
                                    device=device, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                                    frozen=bool(frozen))
        if lora is not None:
            req.lora.CopyFrom(LoraConfig.coerce(lora).to_proto())
        if seed is not None:
            req.seed = int(seed)
        if ttl is not None:
            if not ttl >= 1 or math.isinf(ttl):
                raise ValueError(f"ttl = {ttl!r}: expected a number of seconds >= 1 (None: no lease)")
            req.ttl_seconds = math.ceil(ttl)  # never rounds a short lease down to "no lease"
        return self._unary("CreateBlock", req, timeout)

    def get_block(self, block_id, timeout=None):
        return self._unary("GetBlock", pb.GetBlockRequest(block_id=block_id), timeout)

    def list_blocks(self, min_idle=None, timeout=None):
        """BlockInfos of the server's blocks; with `min_idle` (seconds) only those no call has named
        for at least that long (BlockInfo.idle_seconds). The server filters when it keeps idle
        times; the client filters too, so a server that does not (idle_seconds 0) lists none."""
        req = pb.ListBlocksRequest()
        if min_idle is not None:
            if not min_idle > 0 or math.isinf(min_idle):
                raise ValueError(f"min_idle = {min_idle!r}: expected a number of seconds > 0")
            req.min_idle_seconds = float(min_idle)
        blocks = list(self._unary("ListBlocks", req, timeout).blocks)
        if min_idle is not None:
            blocks = [b for b in blocks if b.idle_seconds >= min_idle]
        return blocks

    def delete_block(self, block_id, timeout=None):
        """Deletes a block; returns how many activation handles that referenced it were freed."""
        return self._unary("DeleteBlock", pb.DeleteBlockRequest(block_id=block_id), timeout).activations_released

    def load_weights(self, block_id, tensors, dtype=None, chunk_bytes=None, timeout=None, on_chunk=None):
        """Streams named tensors ({name: array}, or [(name, array)] / [(name, array, dtype)]) into
        one block, each cut into chunks of at most `chunk_bytes`. `dtype` is the wire dtype (default: float32, or the
        array's own float16 / torch bfloat16; a uint16 array with dtype="bf16" is bfloat16 bits).
        The block changes only if the whole stream is good. on_chunk(nbytes) is called as each
        chunk is sent (progress bars). Returns the names loaded."""
        chunk = int(chunk_bytes or self.chunk_bytes)
        if chunk <= 0:
            raise ValueError(f"chunk_bytes = {chunk}, expected > 0")
        items = tensors.items() if isinstance(tensors, dict) else tensors
        encoded = []  # encode everything first: fail here, not mid-stream
        for item in items:
            name, x, item_dtype = (tuple(item) + (None,))[:3]
            encoded.append((name,) + T.encode(x, item_dtype or dtype))
        if not encoded:
            raise ValueError(f"load_weights({block_id!r}): no tensors given")

        def chunks():
            for name, d, shape, data in encoded:
                view = memoryview(data)
                for off in range(0, max(len(data), 1), chunk):
                    piece = bytes(view[off:off + chunk])
                    yield pb.TensorChunk(block_id=block_id, name=name, dtype=d, shape=shape, offset=off, data=piece)
                    if on_chunk is not None:
                        on_chunk(len(piece))

        try:
            resp = self._stub.LoadWeights(chunks(), timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, "LoadWeights") from None
        return list(resp.loaded)

    def forward(self, block_ids, x, keep_activations=False, position_offset=0, dtype=None, timeout=None,
                transport=None):
        """Runs x [batch, seq, hidden] through the blocks in order. Returns (output, activation_id);
        the id is "" unless keep_activations. `dtype` is the wire dtype ("fp32" / "bf16"); the
        output has x's kind and dtype."""
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids)
        if T.is_torch(x) and x.is_cuda:
            req = pb.ForwardRequest(block_ids=ids, keep_activations=keep_activations, position_offset=position_offset)
            done = self._cuda_ipc_call("Forward", req, "input", "output", x, dtype, transport, timeout)
            if done is not None:
                return ForwardResult(done[1], done[0].activation_id)
        req = pb.ForwardRequest(block_ids=ids, keep_activations=keep_activations, position_offset=position_offset)
        resp, y = self._activation_call("Forward", req, "input", "output", x, dtype, transport, timeout)
        return ForwardResult(y, resp.activation_id)

    def backward(self, activation_id, grad_output, dtype=None, timeout=None, transport=None, group_id=""):
        """Backward through the span of a Forward(keep_activations=True); accumulates the weight
        gradients and frees the handle. Returns grad_input with grad_output's kind and dtype.
        group_id: the caller's replica group holding exactly the span's blocks; each block's
        gradients start being averaged over it as soon as its backward is done (the last
        micro-batch before a group step, on every member; the group's next grad_norm/step takes
        that mean)."""
        if T.is_torch(grad_output) and grad_output.is_cuda:
            req = pb.BackwardRequest(activation_id=activation_id, group_id=group_id)
            done = self._cuda_ipc_call("Backward", req, "grad_output", "grad_input", grad_output, dtype, transport,
                                       timeout)
            if done is not None:
                return done[1]
        req = pb.BackwardRequest(activation_id=activation_id, group_id=group_id)
        return self._activation_call("Backward", req, "grad_output", "grad_input", grad_output, dtype, transport,
                                     timeout)[1]

    def release_activations(self, activation_id, timeout=None):
        """Frees an activation handle without a backward."""
        self._unary("ReleaseActivations", pb.ReleaseActivationsRequest(activation_id=activation_id), timeout)

    def zero_grad(self, block_ids, timeout=None):
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids)
        self._unary("ZeroGrad", pb.ZeroGradRequest(block_ids=ids), timeout)

    def step(self, block_ids, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
             decay_norm_weights=False, max_grad_norm=0.0, group_id="", clip_coefficient=0.0, timeout=None):
        """One AdamW step of the named blocks (torch.optim.AdamW semantics; weight decay on the
        matrices only unless decay_norm_weights). max_grad_norm > 0 clips by the global norm over
        all of them. group_id: a replica group's Step (every member calls at once; block_ids then
        empty or all of the group's): the gradients are averaged across the group first.
        clip_coefficient in (0, 1]: scale the gradients by it instead of max_grad_norm (computed by
        the client over a model spread over daemons, see grad_norm). Returns StepResult(grad_norm
        before clipping, skipped, clip_coefficient, steps {block_id: step})."""
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids or ())
        adamw = pb.AdamW(lr=float(lr), beta1=float(betas[0]), beta2=float(betas[1]), eps=float(eps),
                         weight_decay=float(weight_decay), decay_norm_weights=bool(decay_norm_weights))
        resp = self._unary("Step", pb.StepRequest(block_ids=ids, adamw=adamw, max_grad_norm=float(max_grad_norm),
                                                  group_id=group_id, clip_coefficient=float(clip_coefficient)),
                           timeout)
        return StepResult(resp.grad_norm, resp.skipped, resp.clip_coefficient,
                          collections.OrderedDict((s.block_id, s.step) for s in resp.steps))

    def download_tensors(self, block_id, kind="weights", dtype="float32", names=(), chunk_bytes=0,
                         as_torch=False, timeout=None):
        """{name: tensor} of one block's weights / gradients / adam_m / adam_v, reassembled from
        the streamed chunks. numpy float32 arrays by default (bfloat16 decoded exactly); with
        as_torch, torch tensors in the wire dtype (torch.bfloat16 for dtype="bf16")."""
        wire = T.wire_dtype(dtype)
        req = pb.DownloadTensorsRequest(block_id=block_id, kind=kind_value(kind), dtype=wire, names=list(names),
                                        chunk_bytes=chunk_bytes)
        parts = collections.OrderedDict()  # name -> [dtype, shape, bytearray, bytes received]
        try:
            for c in self._stub.DownloadTensors(req, timeout=self._deadline(timeout), metadata=self._metadata):
                p = parts.get(c.name)
                if p is None:
                    n = 1
                    for s in c.shape:
                        n *= s
                    p = parts[c.name] = [c.dtype, tuple(c.shape), bytearray(n * T.itemsize(c.dtype)), 0]
                end = c.offset + len(c.data)
                if c.dtype != p[0] or tuple(c.shape) != p[1] or c.offset < 0 or end > len(p[2]):
                    raise BlockdError(grpc.StatusCode.DATA_LOSS,
                                      f"chunk [{c.offset}, {end}) of tensor {c.name} does not fit its "
                                      f"{list(p[1])} {T.dtype_name(p[0])} tensor", "DownloadTensors")
                p[2][c.offset:end] = c.data
                p[3] += len(c.data)
        except grpc.RpcError as e:
            raise from_rpc_error(e, "DownloadTensors") from None
        out = collections.OrderedDict()
        like = None
        if as_torch:
            import torch
            like = torch.empty(0, dtype={T.FLOAT32: torch.float32, T.BFLOAT16: torch.bfloat16,
                                         T.FLOAT16: torch.float16}[wire])
        for name, (d, shape, buf, got) in parts.items():
            if got != len(buf):
                raise BlockdError(grpc.StatusCode.DATA_LOSS,
                                  f"tensor {name} arrived incomplete: {got} of {len(buf)} bytes", "DownloadTensors")
            out[name] = T.decode(d, shape, buf, like=like)
        return out

    def save_checkpoint(self, name="", block_ids=(), timeout=None):
        """SaveCheckpointResponse(path, block_ids, bytes); needs blockd --checkpoint_dir."""
        return self._unary("SaveCheckpoint", pb.SaveCheckpointRequest(name=name, block_ids=list(block_ids)), timeout)

    def restore_checkpoint(self, name="", block_ids=(), timeout=None):
        """RestoreCheckpointResponse(path, block_ids); name "" restores the latest checkpoint."""
        return self._unary("RestoreCheckpoint", pb.RestoreCheckpointRequest(name=name, block_ids=list(block_ids)),
                           timeout)

    # -- replica groups (ARCHITECTURE.md, "Replica groups and models across daemons") ---------
    def get_collective_id(self, backend="", timeout=None):
        """On the daemon that will be rank 0: (collective_id bytes, backend) for JoinGroup.
        backend "": the blocks' own ("gloo" for CPU daemons); "gloo"; "nccl"."""
        resp = self._unary("GetCollectiveId", pb.GetCollectiveIdRequest(backend=backend), timeout)
        return resp.collective_id, resp.backend

    def join_group(self, group_id, rank, world_size, collective_id, block_ids, timeout_ms=0, timeout=None):
        """Joins a replica group; every member calls at once (it returns when all joined, or fails
        after timeout_ms). Rank 0's weights and moments are broadcast to the others. Returns the
        GroupInfo."""
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids)
        req = pb.JoinGroupRequest(group_id=group_id, rank=int(rank), world_size=int(world_size),
                                  collective_id=bytes(collective_id), block_ids=ids, timeout_ms=int(timeout_ms))
        return self._unary("JoinGroup", req, timeout)

    def leave_group(self, group_id, timeout=None):
        self._unary("LeaveGroup", pb.LeaveGroupRequest(group_id=group_id), timeout)

    def get_group(self, group_id, timeout=None):
        """GroupInfo: rank, world_size, backend, block_ids, state ("joining"/"ready"/"failed"),
        failure, steps, collective_bytes."""
        return self._unary("GetGroup", pb.GetGroupRequest(group_id=group_id), timeout)

    def list_groups(self, timeout=None):
        """GroupInfos of this caller's groups on this daemon."""
        return list(self._unary("ListGroups", pb.ListGroupsRequest(), timeout).groups)

    def grad_norm(self, block_ids=(), group_id="", timeout=None):
        """GradNormResult(sum_of_squares, finite) of the blocks' gradients; with group_id, of the
        group's mean gradients (every member calls at once; block_ids empty or all of the group's),
        which the group Step right after reuses rather than averaging again."""
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids or ())
        resp = self._unary("GradNorm", pb.GradNormRequest(block_ids=ids, group_id=group_id), timeout)
        return GradNormResult(resp.sum_of_squares, resp.finite)

    # -- inference sessions (ARCHITECTURE.md, "Inference sessions") ----------------------------
    def open_session(self, block_ids, batch_size, max_length, session_id="", ttl=None, timeout=None):
        """Opens a KV-cache session over the span `block_ids` for `batch_size` rows of at most
        `max_length` tokens (prompt included); the whole cache is reserved now, so a later step
        never runs out of memory. session_id "": the server picks one. ttl (seconds): idle time
        before the server closes it (None: --session_ttl). Returns its SessionInfo."""
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids)
        req = pb.OpenSessionRequest(session_id=session_id, block_ids=ids, batch_size=int(batch_size),
                                    max_length=int(max_length))
        if ttl is not None:
            if not ttl >= 1 or math.isinf(ttl):
                raise ValueError(f"ttl = {ttl!r}: expected a number of seconds >= 1 (None: the server's default)")
            req.ttl_seconds = math.ceil(ttl)
        return self._unary("OpenSession", req, timeout)

    def infer_step(self, session_id, hidden_states, hypo_ids=None, step_id=0, dtype=None, timeout=None,
                   transport=None):
        """One step of a session: hidden_states [batch_size, new_tokens, hidden] (the prompt for a
        prefill, one token for a decode step) at positions length .. length+new_tokens-1 of each
        row. hypo_ids (len batch_size): row i first continues from row hypo_ids[i] (beam search).
        step_id != 0: repeating the last one returns its output again without appending (a safe
        retry). Returns InferStepResult(hidden_states like the input, length after, step_id)."""
        req = _infer_request(session_id, None, hypo_ids, step_id, dtype)
        resp, h = self._activation_call("InferStep", req, "hidden_states", "hidden_states", hidden_states, dtype,
                                        transport, timeout)
        return InferStepResult(h, resp.length, resp.step_id)

    def trim_session(self, session_id, length, timeout=None):
        """Rewinds every row of the session to `length` tokens; returns its SessionInfo."""
        return self._unary("TrimSession", pb.TrimSessionRequest(session_id=session_id, length=int(length)), timeout)

    def fork_session(self, session_id, new_session_id="", timeout=None):
        """A new session sharing the cached prefix copy-on-write; returns the new SessionInfo."""
        return self._unary("ForkSession", pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id),
                           timeout)

    def close_session(self, session_id, timeout=None):
        self._unary("CloseSession", pb.CloseSessionRequest(session_id=session_id), timeout)

    def list_sessions(self, timeout=None):
        """SessionInfos of this caller's open sessions."""
        return list(self._unary("ListSessions", pb.ListSessionsRequest(), timeout).sessions)

    def infer_stream(self, timeout=None):
        """An InferStream: the steps of any of this caller's sessions on one bidirectional Infer
        stream (no per-token call setup). `timeout` bounds the whole stream."""
        stream = InferStream(self, timeout)
        self._streams.add(stream)
        return stream


def _infer_request(session_id, hidden_states, hypo_ids, step_id, dtype):
    """An InferStepRequest; hidden_states None leaves its tensor to the caller (_activation_call)."""
    req = pb.InferStepRequest(session_id=session_id, step_id=int(step_id))
    if hidden_states is not None:
        req.hidden_states.CopyFrom(T.to_proto(hidden_states, dtype))
    if hypo_ids is not None:
        req.hypo_ids.extend(int(i) for i in hypo_ids)
    return req


class InferStream:
    """The Infer stream: step() sends one InferStepRequest and waits for its response, in order.

        with client.infer_stream() as s:
            h = s.step(session_id, x).hidden_states

    The first failed step ends the stream (the server's status is raised as a BlockdError, and
    every later step raises it again); close() ends it cleanly."""

    def __init__(self, client, timeout=None):
        self._client = client
        self._requests = queue.SimpleQueue()
        self._error = None
        self._closed = False
        self._responses = client._stub.Infer(iter(self._requests.get, None), timeout=client._deadline(timeout),
                                             metadata=client._metadata)

    def step(self, session_id, hidden_states, hypo_ids=None, step_id=0, dtype=None):
        """As Client.infer_step, on this stream. Returns InferStepResult."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ValueError("this Infer stream is closed; open another with Client.infer_stream()")
        req = _infer_request(session_id, hidden_states, hypo_ids, step_id, dtype)
        size = req.ByteSize()
        if size > self._client.max_message_bytes:
            raise ResourceExhaustedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Infer hidden_states {_tensor_text(req.hidden_states)} is {_size_text(size)}, over the "
                f"{_size_text(self._client.max_message_bytes)} message limit: split the batch", "Infer")
        self._requests.put(req)
        try:
            resp = next(self._responses)
        except grpc.RpcError as e:
            self._error = from_rpc_error(e, "Infer")
            self._closed = True
            raise self._error from None
        except StopIteration:
            self._closed = True
            self._error = UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                           "the server ended the Infer stream without answering the step", "Infer")
            raise self._error from None
        return InferStepResult(T.from_proto(resp.hidden_states, like=hidden_states), resp.length, resp.step_id)

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._requests.put(None)  # a dropped stream half-closes, so the server ends it

    def close(self):
        """Ends the stream (half-close, then wait for the server's end)."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass  # the server's status at the end adds nothing once every step was answered

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
