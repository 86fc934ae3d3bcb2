#!/usr/bin/env node
// A Node.js client of the imagetasks.v1 gRPC service, straight from the .proto files.
//
//   node client.js upscale photo.png photo-2x.png [--server localhost:50051]
//   node client.js convert photo.png photo.webp --format webp [--quality 80]
//
// Options: --server HOST:PORT (env AISERVER_ADDRESS, default localhost:50051), --api-key KEY
// (env AISERVER_API_KEY; sent as `authorization: Bearer KEY`), --tls, --timeout SECONDS,
// --googleapis DIR (env GOOGLEAPIS_PROTOS): a folder holding google/api/annotations.proto and
// google/rpc/status.proto, e.g. the site-packages folder of Python's googleapis-common-protos:
//
//   GOOGLEAPIS_PROTOS=$(python -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]).parent.parent)')
//
// Progress goes to stderr, the saved file's name to stdout. Exit codes: 0 ok, 1 the job
// failed or was cancelled, 2 usage, 3 the server refused the request, 4 unavailable or
// deadline exceeded, 5 unauthenticated / permission denied, 6 other server errors.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const CHUNK_SIZE = 1024 * 1024; // bytes per upload message: well under gRPC's 4 MiB limit
const FORMATS = {
  jpg: 'IMAGE_FORMAT_JPEG', jpeg: 'IMAGE_FORMAT_JPEG', png: 'IMAGE_FORMAT_PNG',
  gif: 'IMAGE_FORMAT_GIF', bmp: 'IMAGE_FORMAT_BMP', tiff: 'IMAGE_FORMAT_TIFF',
  webp: 'IMAGE_FORMAT_WEBP', avif: 'IMAGE_FORMAT_AVIF',
};
const EXIT = { ok: 0, jobFailed: 1, usage: 2, refused: 3, unavailable: 4, auth: 5, server: 6 };
const EXIT_BY_CODE = {
  INVALID_ARGUMENT: EXIT.refused, NOT_FOUND: EXIT.refused, ALREADY_EXISTS: EXIT.refused,
  FAILED_PRECONDITION: EXIT.refused, OUT_OF_RANGE: EXIT.refused,
  RESOURCE_EXHAUSTED: EXIT.refused, UNIMPLEMENTED: EXIT.refused,
  UNAVAILABLE: EXIT.unavailable, DEADLINE_EXCEEDED: EXIT.unavailable, ABORTED: EXIT.unavailable,
  UNAUTHENTICATED: EXIT.auth, PERMISSION_DENIED: EXIT.auth,
};
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

class UsageError extends Error {}

function usage(message) {
  throw new UsageError(
    `${message}\nusage: node client.js upscale IN OUT | convert IN OUT --format FMT [--quality N]` +
      ' [--server HOST:PORT] [--api-key KEY] [--tls] [--timeout S] [--googleapis DIR]',
  );
}

function parseArgs(argv) {
  const opts = {
    server: process.env.AISERVER_ADDRESS || 'localhost:50051',
    apiKey: process.env.AISERVER_API_KEY || '',
    googleapis: process.env.GOOGLEAPIS_PROTOS || '',
    tls: false,
    timeout: 0,
    format: '',
    quality: undefined,
    positional: [],
  };
  const valued = { '--server': 'server', '--api-key': 'apiKey', '--googleapis': 'googleapis',
    '--timeout': 'timeout', '--format': 'format', '--quality': 'quality' };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--tls') opts.tls = true;
    else if (arg in valued) {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      opts[valued[arg]] = argv[++i];
    } else if (arg.startsWith('--')) usage(`unknown option ${arg}`);
    else opts.positional.push(arg);
  }
  const [command, input, output] = opts.positional;
  if (!['upscale', 'convert'].includes(command) || !input || !output || opts.positional.length > 3) {
    usage('expected: a command (upscale or convert), an input file and an output file');
  }
  if (command === 'convert' && !(opts.format.toLowerCase() in FORMATS)) {
    usage(`convert needs --format, one of ${Object.keys(FORMATS).join(', ')}`);
  }
  if (!opts.googleapis) {
    usage('the googleapis protos are needed: --googleapis DIR or GOOGLEAPIS_PROTOS');
  }
  if (!fs.existsSync(path.join(opts.googleapis, 'google', 'api', 'annotations.proto'))) {
    usage(`no google/api/annotations.proto under ${opts.googleapis}`);
  }
  return { ...opts, command, input, output };
}

// The protos import buf/validate/validate.proto for their validation rules (the server enforces
// them); a client needs only the messages, so that import is skipped when it is not at hand.
const VALIDATE_PROTO = 'buf/validate/validate.proto';

function loadServices(googleapis) {
  const includeDirs = [PROTOS, googleapis];
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => {
    for (const dir of includeDirs) {
      const full = path.join(dir, target);
      if (fs.existsSync(full)) return full;
    }
    return target === VALIDATE_PROTO ? null : target;
  };
  root.loadSync(
    ['imagetasks/v1/generation_service.proto', 'imagetasks/v1/transform_service.proto'],
    { keepCase: true },
  );
  root.resolveAll();
  const definition = protoLoader.fromJSON(root.toJSON(), {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).imagetasks.v1;
}

// google.rpc.Status details (ErrorInfo, BadRequest) from the `grpc-status-details-bin` trailer.
function describeError(err, googleapis) {
  const code = CODE_NAMES[err.code] || String(err.code);
  let text = `${code}: ${err.details || err.message}`;
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (raw) {
    try {
      const root = new protobuf.Root();
      root.resolvePath = (_origin, target) => {
        const local = path.join(googleapis, target);
        return fs.existsSync(local) ? local : target;
      };
      root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'],
        { keepCase: true });
      const status = root.lookupType('google.rpc.Status').decode(raw);
      for (const detail of status.details) {
        const type = detail.type_url.split('/').pop();
        if (type === 'google.rpc.ErrorInfo') {
          text += ` [${root.lookupType(type).decode(detail.value).reason}]`;
        } else if (type === 'google.rpc.BadRequest') {
          const bad = root.lookupType(type).decode(detail.value);
          const fields = bad.field_violations.map((v) => `${v.field}: ${v.description}`);
          if (fields.length) text += ` (${fields.join('; ')})`;
        }
      }
    } catch (decodeError) {
      text += ` (undecodable status details: ${decodeError.message})`;
    }
  }
  return { text: text.replace(/\s+/g, ' '), exit: EXIT_BY_CODE[code] ?? EXIT.server };
}

// Writes one message, waiting for 'drain' when the stream is full; false once the call ended
// (the server refused the upload: its status arrives on the response side).
function write(call, state, message) {
  return new Promise((resolve) => {
    if (state.ended) return resolve(false);
    if (call.write(message)) return resolve(true);
    const done = (flushed) => {
      call.off('drain', onDrain);
      call.off('status', onEnd);
      resolve(flushed);
    };
    const onDrain = () => done(true);
    const onEnd = () => done(false);
    call.once('drain', onDrain);
    call.once('status', onEnd);
  });
}

// Params first, then the image in 1 MiB chunks, then half-close.
async function upload(call, state, params, file) {
  if (!(await write(call, state, { params }))) return;
  const stream = fs.createReadStream(file, { highWaterMark: CHUNK_SIZE });
  let first = true;
  try {
    for await (const data of stream) {
      const chunk = { field: 'image', data, file_name: first ? path.basename(file) : '' };
      first = false;
      if (!(await write(call, state, { chunk }))) return;
    }
    if (first && !(await write(call, state, { chunk: { field: 'image', data: Buffer.alloc(0) } }))) {
      return;
    }
  } finally {
    stream.destroy();
  }
  if (!state.ended) call.end();
}

function startCall(method, opts) {
  const metadata = new grpc.Metadata();
  if (opts.apiKey) metadata.set('authorization', `Bearer ${opts.apiKey}`);
  const options = opts.timeout ? { deadline: Date.now() + Number(opts.timeout) * 1000 } : {};
  const call = method(metadata, options);
  const state = { ended: false };
  call.on('status', () => { state.ended = true; });
  const finished = new Promise((resolve, reject) => {
    call.on('error', reject);
    call.on('status', (status) => { if (status.code === grpc.status.OK) resolve(); });
  });
  return { call, state, finished };
}

const tty = process.stderr.isTTY;
function progressLine(text, keep) {
  if (tty) process.stderr.write(`\r\x1b[2K${text}${keep ? '\n' : ''}`);
  else process.stderr.write(`${text}\n`);
}

async function upscale(services, opts) {
  const client = new services.GenerationService(opts.server, credentials(opts));
  const { call, state, finished } = startCall(client.ImageUpscale.bind(client), opts);
  let out = null;
  let job = null;
  let lastPercent = -1;
  call.on('data', ({ event }) => {
    switch (event.kind) {
      case 'accepted':
        progressLine(`accepted ${event.job}, queue position ${event.accepted.queue_position}`, true);
        break;
      case 'progress': {
        const p = event.progress;
        const percent = Math.floor(p.fraction * 100);
        if (tty || percent !== lastPercent) {
          lastPercent = percent;
          const stage = p.stage.replace('STAGE_', '').toLowerCase();
          const steps = p.max_steps ? ` step ${p.step}/${p.max_steps}` : '';
          progressLine(`${stage}${p.node_type ? ` ${p.node_type}` : ''}${steps} ${percent}%`, false);
        }
        break;
      }
      case 'output': {
        const a = event.output.artifact;
        progressLine(`output ${event.output.index}: ${a.name} (${a.width}x${a.height})`, true);
        if (event.output.index === 0) out = fs.createWriteStream(`${opts.output}.part`);
        break;
      }
      case 'output_chunk':
        if (event.output_chunk.index === 0 && out) out.write(event.output_chunk.data);
        break;
      case 'finished':
        job = event.finished.job;
        progressLine(`finished: ${job.state.replace('STATE_', '')}`, true);
        break;
      default:
        break;
    }
  });
  await upload(call, state, { model: '' }, opts.input);
  await finished;
  if (out) await new Promise((resolve, reject) => out.end((e) => (e ? reject(e) : resolve())));
  if (!job || job.state !== 'STATE_SUCCEEDED') {
    const why = job && job.error ? `: ${job.error.message}` : '';
    console.error(`error: job ${job ? job.name : ''} ${job ? job.state : 'did not finish'}${why}`);
    return EXIT.jobFailed;
  }
  fs.renameSync(`${opts.output}.part`, opts.output);
  console.log(opts.output);
  return EXIT.ok;
}

async function convert(services, opts) {
  const client = new services.TransformService(opts.server, credentials(opts));
  const { call, state, finished } = startCall(client.ConvertImage.bind(client), opts);
  const out = fs.createWriteStream(`${opts.output}.part`);
  let info = null;
  call.on('data', (message) => {
    if (message.payload === 'info') {
      info = message.info;
      progressLine(`converting to ${info.mime_type}, ${info.width}x${info.height}`, true);
    } else {
      out.write(message.chunk);
    }
  });
  const params = { output_format: FORMATS[opts.format.toLowerCase()] };
  if (opts.quality !== undefined) params.quality = Number(opts.quality);
  try {
    await upload(call, state, params, opts.input);
    await finished;
  } finally {
    await new Promise((resolve) => out.end(resolve));
  }
  fs.renameSync(`${opts.output}.part`, opts.output);
  console.log(`${opts.output}: ${info.width}x${info.height} ${info.mime_type}, ${info.size_bytes} bytes`);
  return EXIT.ok;
}

function credentials(opts) {
  return opts.tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
    if (!fs.statSync(opts.input, { throwIfNoEntry: false })?.isFile()) {
      usage(`cannot read ${opts.input}`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`error: ${err.message}`);
      return EXIT.usage;
    }
    throw err;
  }
  const services = loadServices(opts.googleapis);
  try {
    return opts.command === 'upscale' ? await upscale(services, opts) : await convert(services, opts);
  } catch (err) {
    if (typeof err.code !== 'number') throw err;
    fs.rmSync(`${opts.output}.part`, { force: true });
    const { text, exit } = describeError(err, opts.googleapis);
    console.error(`error: ${text}`);
    return exit;
  }
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => { console.error(err); process.exitCode = EXIT.server; },
);
